"""MeanFlow and shortcut models (diffusion_jax.flow_maps, the samplers "meanflow" and "shortcut")
against the closed-form flow of Gaussian data, and tiny networks that learn under both.

For x0 ~ N(MU, S^2) under x_t = (1 - t) x0 + t eps the marginal is N(m_t, sd_t^2), m_t = (1 - t) MU,
sd_t^2 = (1 - t)^2 S^2 + t^2, and the probability-flow ODE keeps the standardised value fixed:
    x_r = m_r + (sd_r / sd_t) (x_t - m_t),   v(x, t) = -MU + (sd_t' / sd_t) (x - m_t),
so the average velocity is u(x, r, t) = (x - x_r) / (t - r) along the exact trajectory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import flow_maps, models, processes, samplers
from diffusion_jax.train import config as config_lib

MU, S = 0.7, 0.4


def _sd(t, xp=jnp):
    return xp.sqrt((1 - t) ** 2 * S * S + t * t)


def exact_u(x, t, r, xp=jnp):
    """The average velocity over [r, t] of the Gaussian data's flow (x [B, D], t and r [B])."""
    t, r = t[:, None], r[:, None]
    x_r = (1 - r) * MU + _sd(r, xp) / _sd(t, xp) * (x - (1 - t) * MU)
    h = t - r
    safe = xp.where(h == 0, 1.0, h)
    return xp.where(h == 0, exact_v(x, t[:, 0], xp), (x - x_r) / safe)


def exact_v(x, t, xp=jnp):
    t = t[:, None]
    dsd = (t - (1 - t) * S * S) / _sd(t, xp)
    return -MU + dsd / _sd(t, xp) * (x - (1 - t) * MU)


def _points(n=64, d=3, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    t = jax.random.uniform(k1, (n,), minval=0.05, maxval=1.0)
    r = t * jax.random.uniform(k2, (n,))
    x = (1 - t[:, None]) * MU + _sd(t)[:, None] * jax.random.normal(k3, (n, d))
    return x, t, r


def test_meanflow_target_from_the_exact_velocity_is_the_exact_average_velocity():
    x, t, r = (np.asarray(a, np.float64) for a in _points())
    u_fn = lambda x, t, r: exact_u(x, t, r)  # noqa: E731
    with jax.enable_x64(True):
        target = jax.jit(lambda x, t, r: flow_maps.meanflow_target(u_fn, x, t, r, exact_v(x, t)))
        np.testing.assert_allclose(target(x, t, r), exact_u(x, t, r, np), rtol=1e-10, atol=1e-12)
        # at r = t the target is the velocity: flow matching
        np.testing.assert_allclose(target(x, t, t), exact_v(x, t, np), rtol=1e-10, atol=1e-12)


def test_meanflow_target_with_the_predicted_tangent_regresses_the_conditional_velocity():
    """iMF's form (Geng et al. 2025b): the JVP's x-tangent is the marginal velocity (here the exact
    one, standing for the network's u(x_t, t, t)) while v in front stays the conditional eps - x0.
    Then u_tgt = u(x_t, r, t) + (v_c - v(x_t, t)): the exact average velocity plus the zero-mean
    noise of the flow-matching target, the JVP term free of that noise; with v_c as the tangent
    (MeanFlow) the target differs by (t - r) d_x u (v_c - v) besides."""
    x, t, r = (np.asarray(a, np.float64) for a in _points())
    v_c = np.asarray(jax.random.normal(jax.random.PRNGKey(7), x.shape), np.float64)
    u_fn = lambda x, t, r: exact_u(x, t, r)  # noqa: E731
    with jax.enable_x64(True):
        predicted = flow_maps.meanflow_target(u_fn, x, t, r, jnp.asarray(v_c), exact_v(jnp.asarray(x), jnp.asarray(t)))
        conditional = flow_maps.meanflow_target(u_fn, x, t, r, jnp.asarray(v_c))
    np.testing.assert_allclose(predicted, exact_u(x, t, r, np) + v_c - exact_v(x, t, np), rtol=1e-10, atol=1e-12)
    # the Gaussian flow's d_x u is the scalar (1 - sd_r / sd_t) / (t - r): the MeanFlow target's extra term
    scale = (1 - _sd(r, np) / _sd(t, np))[:, None]
    np.testing.assert_allclose(conditional - predicted, -scale * (v_c - exact_v(x, t, np)), rtol=1e-9, atol=1e-12)


def test_meanflow_jvp_matches_a_float64_finite_difference():
    """du/dt of the JVP with tangent (v, 1, 0) in (x, t, r) against the central difference of
    u(x + e v, t + e, r) in float64."""
    x, t, r = (np.asarray(a, np.float64) for a in _points(16))
    with jax.enable_x64(True):
        v = exact_v(jnp.asarray(x), jnp.asarray(t))
        _, du_dt = jax.jvp(exact_u, (jnp.asarray(x), jnp.asarray(t), jnp.asarray(r)),
                           (v, jnp.ones_like(t), jnp.zeros_like(r)))
        assert du_dt.dtype == jnp.float64
    v = np.asarray(v)
    e = 1e-6
    fd = (exact_u(x + e * v, t + e, r, np) - exact_u(x - e * v, t - e, r, np)) / (2 * e)
    np.testing.assert_allclose(np.asarray(du_dt), fd, rtol=1e-6, atol=1e-8)


def _denoise_exact(process):
    """samplers.denoiser over a fake network that reads (t, r) back from its inputs."""
    def model_fn(x_in, c_noise, h=None):
        t = c_noise / 1000.0
        r = t if h is None else t - h / 1000.0
        return exact_u(x_in, t, r)
    return samplers.denoiser(model_fn, process, "velocity")


@pytest.mark.parametrize("name,k", [("meanflow", 1), ("meanflow", 2), ("shortcut", 4)])
def test_flow_map_samplers_driven_by_the_exact_u_reproduce_the_data_law(name, k):
    process = processes.Flow()
    sampler = samplers.make(name, num_steps=k)
    assert sampler.nfe(process) == k and np.allclose(sampler.times(process), 1 - np.arange(k + 1) / k)
    z = jax.random.normal(jax.random.PRNGKey(3), (4096, 1))
    x0 = sampler(_denoise_exact(process), process, z)
    # the flow is monotone: each noise quantile lands on the data quantile MU + S z
    np.testing.assert_allclose(x0, MU + S * z, atol=2e-5)
    assert abs(float(x0.mean()) - MU) < 0.02 and abs(float(x0.std()) - S) < 0.02
    with pytest.raises(ValueError, match="flow process"):
        sampler.times(processes.EDM())


def test_shortcut_two_half_steps_are_one_step_and_flow_matching_at_d_zero():
    x, t, _ = _points()
    d = jnp.minimum(t, 2.0 ** -jax.random.randint(jax.random.PRNGKey(5), t.shape, 0, 4))
    u_fn = lambda x, t, r: exact_u(x, t, r)  # noqa: E731
    np.testing.assert_allclose(flow_maps.shortcut_target(u_fn, x, t, d), exact_u(x, t, t - d), atol=2e-5)
    np.testing.assert_allclose(flow_maps.shortcut_target(u_fn, x, t, jnp.zeros_like(t)), exact_v(x, t), atol=1e-6)
    # the exact flow map composes: x_{t-d} from one step equals two half steps
    s = d / 2
    x_mid = x - s[:, None] * exact_u(x, t, t - s)
    np.testing.assert_allclose(x_mid - s[:, None] * exact_u(x_mid, t - s, t - d),
                               x - d[:, None] * exact_u(x, t, t - d), atol=2e-5)


def test_objective_settings_draws_and_errors():
    mf, sc = flow_maps.MeanFlow(ratio=0.5), flow_maps.Shortcut(num_levels=3)
    t, r = mf.times(processes.Flow("logit_normal", -0.4), jax.random.uniform(jax.random.PRNGKey(0), (8,)),
                    jax.random.PRNGKey(1))
    assert bool(jnp.all(t[:4] == r[:4])) and bool(jnp.all(r[4:] < t[4:]))
    tb, d, finest = jax.jit(sc.steps, static_argnums=0)(512, jax.random.PRNGKey(2))
    m = tb / d
    assert set(np.unique(np.asarray(d)).tolist()) == {1.0, 0.5, 0.25, 0.125}
    assert np.allclose(m, np.round(m)) and bool(jnp.all((m >= 1) & (tb <= 1))) and bool(jnp.all(finest == (d == 0.125)))
    for cls, kw, field in ((flow_maps.MeanFlow, {"ratio": 1.5}, "ratio"), (flow_maps.MeanFlow, {"norm_eps": 0.0}, "norm_eps"),
                           (flow_maps.Shortcut, {"teacher": "old"}, "teacher"), (flow_maps.Shortcut, {"num_levels": 1.5}, "num_levels"),
                           (flow_maps.Shortcut, {"kappa": 1.0}, "kappa")):
        with pytest.raises(ValueError, match=field):
            cls(**kw)


def test_interval_input_is_off_by_default_and_adds_only_its_embedding():
    x, t = jnp.ones((2, 8, 8, 1)), jnp.array([0.1, 0.9])
    paths = lambda p: {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]}  # noqa: E731
    for name, extra in (("unet", dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=4)),
                        ("dit", dict(hidden_size=32, depth=1, num_heads=2, patch_size=4, freq_dim=16))):
        base = dict(models.default_config(name).to_dict(), image_size=8, num_classes=3, **extra)
        trees = [jax.eval_shape(lambda: models.create(dict(base, interval_input=on)).init(
            jax.random.PRNGKey(0), x, t)["params"]) for on in (False, True)]
        off, on = paths(trees[0]), paths(trees[1])
        assert "interval" not in str(off) and on - off and all(p.startswith("['embed']['interval']") for p in on - off)
    # h = None is h = 0 (the velocity); another h changes the output
    model = models.create(dict(base, interval_input=True))

    labels, null, h = jnp.array([0, 2]), jnp.array([3, 3]), jnp.array([0.05, 0.5])

    @jax.jit
    def outputs():
        params = jax.tree.map(lambda a: a + 0.05, model.init(jax.random.PRNGKey(0), x, t)["params"])
        ys = [model.apply({"params": params}, x, t, c, h=hh) for c, hh in ((null, jnp.zeros(2)), (null, None),
                                                                          (null, h), (labels, h))]
        guided = models.guidance.guided_denoise_fn(model.apply, params, labels, 0.5, uncond=null)(x, t, h)
        return ys, guided

    (y0, y_none, y1, y1_cond), guided = outputs()
    np.testing.assert_allclose(y0, y_none, atol=1e-6)
    assert float(jnp.abs(y1 - y_none).max()) > 1e-4
    # classifier-free guidance at sampling passes h to both halves of its batch
    np.testing.assert_allclose(guided, 1.5 * y1_cond - 0.5 * y1, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist_meanflow", "mnist_shortcut"])
def test_a_tiny_network_learns_under_each_experiment_s_objective(name):
    """The experiment's config at the smoke scale (8x8 images, a one-level UNet, batch 8) validates,
    and its train step (train/step.py) over 400 steps on fixed images (one per label, so the
    velocity is a function of (x_t, t, label)) lowers the squared error 10x. (Its sampler through
    launch.py's sample and eval modes: docs/flow_maps.md.)"""
    import importlib

    from diffusion_jax.train import sampling, state as state_lib, step as step_lib

    config = importlib.import_module(f"experiments.{name}").get_config()
    config_lib.validate(config)
    assert (config.diffusion.objective, config.sample.method, config.sample.num_steps) == (name[6:], name[6:], 1)
    assert config.model.interval_input and config.sample.guidance_scale == 0.0
    config.data.dataset = "synthetic"
    config.model.update(image_size=8, num_classes=3, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        norm_groups=4)
    config.diffusion[config.diffusion.objective].omega = 1.0  # the target as it is learned without guidance
    config.training.update(batch_size=8, cond_drop_prob=0.0)
    config_lib.validate(config)

    model, process, lr = models.create(config.model), sampling.make_process(config), 3e-3
    labels = jnp.arange(8) % 3
    batch = {"image": jnp.tanh(2 * jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1)))[labels], "label": labels}
    params = model.init(jax.random.PRNGKey(1), batch["image"], jnp.zeros(8), labels)["params"]
    tx = optax.adam(lr)
    state = state_lib.TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params))
    train_step = step_lib.make_train_step(config, model, process, tx, lambda s: lr)

    @jax.jit
    def run(state):
        return jax.lax.scan(lambda s, _: (lambda out: (out[0], out[1]["mse"]))(
            train_step(s, batch, jax.random.PRNGKey(2))), state, None, length=400)

    state, mse = run(state)
    mse = np.asarray(mse)
    assert np.all(np.isfinite(mse)) and mse[-20:].mean() < mse[:5].mean() / 10, (mse[:5].mean(), mse[-20:].mean())



@pytest.mark.parametrize("fields,message", [
    ({"diffusion.objective": "consistency"}, "config.diffusion.objective must be one of"),
    ({"diffusion.process": "edm", "diffusion.prediction": "edm", "sample.method": "heun"},
     "config.diffusion.objective: objective 'meanflow' needs process 'flow'"),
    ({"model.interval_input": False}, "needs model.interval_input=True"),
    ({"diffusion.meanflow.ratio": -0.1}, "config.diffusion.meanflow.ratio"),
    ({"diffusion.meanflow.tangent": "marginal"}, "config.diffusion.meanflow.tangent must be one of"),
    ({"diffusion.process": "edm", "diffusion.prediction": "edm", "diffusion.objective": "denoising"},
     "config.sample.method 'meanflow' needs the flow process"),
    ({"diffusion.prediction": "x0", "diffusion.objective": "denoising"}, "config.sample.method must be a sampler other"),
])
def test_bad_flow_map_fields_raise_one_line_errors(fields, message):
    from experiments import mnist_meanflow

    config = mnist_meanflow.get_config()
    for path, value in fields.items():
        *parents, leaf = path.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[leaf] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_checkpoints_without_the_new_fields_still_match():
    from diffusion_jax.train import checkpoints
    from experiments import mnist

    current = checkpoints.config_dict(mnist.get_config())
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
    old["model"] = {k: v for k, v in current["model"].items() if k != "interval_input"}
    old["diffusion"] = {k: v for k, v in current["diffusion"].items() if k not in ("objective", "meanflow", "shortcut")}
    assert checkpoints.diff_configs(old, current) == []
    changed = dict(current, model=dict(current["model"], interval_input=True))
    assert [c.field for c in checkpoints.diff_configs(old, changed)] == ["model.interval_input"]


def test_dit_checkpoints_without_the_new_fields_still_match():
    """A DiT checkpoint from before long_skip, conv_head and conv_stem (#22) loads; turning one on does not."""
    from diffusion_jax.train import checkpoints
    from experiments import mnist_dit

    config = mnist_dit.get_config()
    config.model.long_skip, config.model.conv_head, config.model.conv_stem = False, False, 0
    current = checkpoints.config_dict(config)
    new = ("long_skip", "conv_head", "conv_stem")
    old = dict(current, model={k: v for k, v in current["model"].items() if k not in new})
    assert set(new) <= set(current["model"]) and checkpoints.diff_configs(old, current) == []
    changed = dict(current, model=dict(current["model"], conv_stem=16))
    assert [str(c) for c in checkpoints.diff_configs(old, changed)] == ["model.conv_stem: checkpoint 0 vs config 16"]
