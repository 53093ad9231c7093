"""diffusion_jax.models (UNet, DiT, create): shapes, parameter anchors, init, conditioning, learning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffusion_jax import models, ops
from models_support import count, init, jit, random_variables, tiny_dit, tiny_unet, TINY


# --------------------------------------------------------------------------- shapes and size


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_output_shapes(name, size, channels):
    if name == "unet":
        cfg = tiny_unet(image_size=size, in_channels=channels, ch_mult=(1, 2, 2),
                        attn_resolutions=(size // 4,), num_classes=10)
    else:
        cfg = tiny_dit(image_size=size, in_channels=channels, patch_size=4 if size != 28 else 2, num_classes=10)
    for learn_sigma in (False, True):
        cfg.learn_sigma = learn_sigma
        model = models.create(cfg)
        x = jax.ShapeDtypeStruct((3, size, size, channels), jnp.float32)
        t = jax.ShapeDtypeStruct((3,), jnp.int32)
        y = jax.ShapeDtypeStruct((3,), jnp.int32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
        out = jax.eval_shape(lambda v, x, t, y: model.apply(v, x, t, y), variables, x, t, y)
        assert out.shape == (3, size, size, channels * (2 if learn_sigma else 1))
        assert out.dtype == jnp.float32
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


@pytest.mark.parametrize("depth", [4, 5])
def test_dit_long_skips_and_conv_head_parameters(depth):
    """U-ViT's long skips (Bao et al. 2023): the last depth//2 blocks each get a Dense from 2D to D
    (2 D^2 + D parameters) before them, fed by the mirrored shallow block; the conv head is one
    3x3 conv C -> C (9 C^2 + C). Shapes are unchanged."""
    d, c = 32, 3
    base = tiny_dit(depth=depth, hidden_size=d, in_channels=c, num_classes=10)
    x = jax.ShapeDtypeStruct((2, 16, 16, c), jnp.float32)
    t = y = jax.ShapeDtypeStruct((2,), jnp.int32)
    counts = {}
    for skip, head in ((False, False), (True, False), (False, True)):
        model = models.create(tiny_dit(**{**base.to_dict(), "long_skip": skip, "conv_head": head}))
        v = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
        out = jax.eval_shape(lambda v, x, t, y: model.apply(v, x, t, y), v, x, t, y)
        assert out.shape == (2, 16, 16, c)
        counts[skip, head] = count(v)
        if skip:
            assert sorted(k for k in v["params"] if k.startswith("skip_")) == [
                f"skip_{i}" for i in range(depth - depth // 2, depth)]
    assert counts[True, False] - counts[False, False] == (depth // 2) * (2 * d * d + d)
    assert counts[False, True] - counts[False, False] == 9 * c * c + c


def test_dit_conv_stem_parameters_and_shapes():
    """conv_stem = S adds a 3x3 conv C -> S, two of the UNet's ResBlocks at width S (each two 3x3
    convs S -> S, two GroupNorms, an embedding Dense D -> S: 18 S^2 + D S + 7 S), a GroupNorm and a
    3x3 conv S -> C in the head; the patch embedding and the final Dense see S channels instead of C."""
    d, c, p, s = 32, 3, 4, 8
    x = jax.ShapeDtypeStruct((2, 16, 16, c), jnp.float32)
    t = y = jax.ShapeDtypeStruct((2,), jnp.int32)
    counts = {}
    for stem in (0, s):
        model = models.create(tiny_dit(hidden_size=d, in_channels=c, patch_size=p, num_classes=10, conv_stem=stem))
        v = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
        out = jax.eval_shape(lambda v, x, t, y: model.apply(v, x, t, y), v, x, t, y)
        assert out.shape == (2, 16, 16, c)
        counts[stem] = count(v)
    resblock = 18 * s * s + d * s + 7 * s
    added = (9 * c * s + s) + 2 * resblock + 2 * s + (9 * s * c + c) + p * p * (s - c) * d + (d + 1) * p * p * (s - c)
    assert counts[s] - counts[0] == added


def test_ddpm_cifar10_has_35_7m_parameters():
    """Ho et al. 2020 report 35.7M parameters for their CIFAR-10 network."""
    cfg = models.ddpm_cifar10_config()
    model = models.create(cfg)
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    n = count(variables)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


def test_dit_sizes_match_paper_widths():
    """DiT-S/2 and DiT-B/2 at 256px (latent 32x32x4) have 33M and 130M parameters (Peebles & Xie 2023, Table 1)."""
    for size, expected in (("S", 33e6), ("B", 130e6)):
        cfg = models.default_config("dit", size=size)
        cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma = 32, 4, 1000, True
        model = models.create(cfg)
        variables = jax.eval_shape(
            model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
        )
        assert abs(count(variables) - expected) / expected < 0.03, (size, count(variables))


# --------------------------------------------------------------------------- init and conditioning


@pytest.fixture(scope="module")
def learner():
    """Tiny class-conditional UNet and DiT for 16x16x1, really initialised (shared by two tests)."""
    out = {}
    for name, cfg in (("unet", tiny_unet(ch=16, num_classes=4)),
                      ("dit", tiny_dit(hidden_size=64, num_heads=4, num_classes=4)),
                      ("uvit", tiny_dit(hidden_size=64, num_heads=4, num_classes=4, depth=3,
                                        long_skip=True, conv_head=True)),
                      ("stem", tiny_dit(hidden_size=64, num_heads=4, num_classes=4, depth=3,
                                        long_skip=True, conv_stem=8))):
        model = models.create(cfg)
        out[name] = (model, init(model, cfg, batch=8, cond=jnp.zeros(8, jnp.int32)))
    return out


@pytest.mark.parametrize("name", ["unet", "dit", "uvit", "stem"])
def test_zero_initialised_output(learner, name):
    model, v = learner[name]
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
    out = jit(model.apply)(v, x, jnp.arange(8) * 120, jnp.arange(8) % 5)
    assert np.all(np.asarray(out) == 0.0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))


@pytest.mark.slow
@pytest.mark.parametrize("name, combine", [("unet", "add"), ("dit", "concat")])
def test_labels_change_output_and_null_is_honoured(name, combine):
    cfg = TINY[name](num_classes=3, cond_combine=combine)
    model = models.create(cfg)
    v = random_variables(model, cfg, seed=2)
    assert ("combine" in v["params"]["embed"]) == (combine == "concat")
    assert v["params"]["embed"]["cond"]["label_table"]["embedding"].shape[0] == 4  # 3 classes + null
    apply = jit(model.apply)
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
    t = jnp.array([10, 10])
    out0 = apply(v, x, t, jnp.array([0, 0]))
    out1 = apply(v, x, t, jnp.array([1, 1]))
    assert float(jnp.max(jnp.abs(out0 - out1))) > 1e-4
    null = apply(v, x, t, jnp.array([3, 3]))
    np.testing.assert_array_equal(np.asarray(apply(v, x, t, None)), np.asarray(null))
    assert float(jnp.max(jnp.abs(null - out0))) > 1e-4


@pytest.mark.slow
def test_text_condition_and_zero_vector_null():
    cfg = tiny_unet(cond_dim=6, cond_combine="concat")
    model = models.create(cfg)
    c = jax.random.normal(jax.random.key(4), (2, 6))
    v = random_variables(model, cfg, cond=c, seed=5)
    assert v["params"]["embed"]["cond"]["text_proj"]["kernel"].shape == (6, 4 * cfg.ch)
    apply = jit(model.apply)
    x, t = jax.random.normal(jax.random.key(6), (2, 16, 16, 1)), jnp.array([5, 900])
    assert float(jnp.max(jnp.abs(apply(v, x, t, c) - apply(v, x, t, 2 * c)))) > 1e-4
    np.testing.assert_array_equal(np.asarray(apply(v, x, t, None)), np.asarray(apply(v, x, t, jnp.zeros((2, 6)))))


def test_unconditional_model_rejects_cond():
    cfg = tiny_dit()
    model = models.create(cfg)
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros(1, jnp.int32),
                       jnp.zeros(1, jnp.int32))


# --------------------------------------------------------------------------- gradients, jit, dtype


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_jit_forward_backward_gradients_finite(name):
    cfg = TINY[name](num_classes=2, dropout=0.1, learn_sigma=True,
                     **({"use_scale_shift_norm": True, "resblock_updown": True} if name == "unet" else {}))
    model = models.create(cfg)
    v = random_variables(model, cfg, cond=jnp.zeros(2, jnp.int32), seed=7)
    x = jax.random.normal(jax.random.key(8), (2, 16, 16, 1))

    @jit
    def loss_and_grad(params, key):
        def loss(p):
            out = model.apply({"params": p}, x, jnp.array([1, 999]), jnp.array([0, 2]), train=True,
                              rngs={"dropout": key})
            return jnp.mean(out**2)
        return jax.value_and_grad(loss)(params)

    val, grads = loss_and_grad(v["params"], jax.random.key(9))
    flat = jax.tree.leaves(grads)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in flat)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in flat) > 0
    # dropout: different keys give different training outputs
    _, grads2 = loss_and_grad(v["params"], jax.random.key(10))
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(flat, jax.tree.leaves(grads2)))


@pytest.mark.slow
def test_bfloat16_compute_with_float32_params():
    cfg = tiny_unet()
    model32 = models.create(cfg)
    v = random_variables(model32, cfg, seed=11)
    cfg.dtype = "bfloat16"
    model16 = models.create(cfg)
    x, t = jax.random.normal(jax.random.key(12), (2, 16, 16, 1)), jnp.array([3, 300])
    out32 = jit(model32.apply)(v, x, t)
    out16 = jit(model16.apply)(v, x, t)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "name, overrides, field",
    [
        ("unet", {"name": "resnet"}, "name"),
        ("unet", {"image_size": 30}, "image_size"),  # 30 not divisible by 4 for ch_mult (1, 2, 2)
        ("unet", {"cond_combine": "mul"}, "cond_combine"),
        ("unet", {"attn_resolutions": (5,)}, "attn_resolutions"),
        ("unet", {"dtype": "float16"}, "dtype"),
        ("unet", {"num_classes": 10, "cond_dim": 8}, "cond_dim"),
        ("unet", {"head_channels": 48}, "head_channels"),
        ("unet", {"dropout": 1.5}, "dropout"),
        ("dit", {"patch_size": 3}, "patch_size"),
        ("dit", {"hidden_size": 250}, "hidden_size"),
        ("dit", {"ch": 64}, "ch"),  # unknown field for a DiT
        ("dit", {"long_skip": 1}, "long_skip"),
        ("dit", {"conv_head": "yes"}, "conv_head"),
        ("dit", {"conv_stem": -1}, "conv_stem"),
        ("dit", {"conv_stem": 16, "conv_head": True}, "conv_head"),
    ],
)
def test_create_rejects_bad_fields(name, overrides, field):
    cfg = models.default_config(name).to_dict()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=repr(field)):
        models.create(cfg)


def test_default_configs_and_experiment_config():
    for name in models.NAMES:
        model = models.create(models.default_config(name))
        assert isinstance(model, (models.UNet, models.DiT))
    exp = ml_collections.ConfigDict({"model": tiny_dit().to_dict(), "lr": 1e-4})
    assert models.create(exp).hidden_size == 32
    # the benchmarked MNIST UNet: 6.47M parameters (issue 6)
    model = models.create(models.default_config("unet"))
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),
                       jax.ShapeDtypeStruct((1,), jnp.int32))
    assert count(v) == 6_469_889


# --------------------------------------------------------------------------- learning


def digit_like_batch(n=8, size=16) -> np.ndarray:
    """n distinct stroke images in [-1, 1]: bars, diagonals, a box, a ring, a cross."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    masks = [
        np.abs(xx - 0.5) < 0.1,  # "1"
        np.abs(yy - 0.5) < 0.1,  # "-"
        np.abs(xx - yy) < 0.1,  # "\"
        np.abs(xx + yy - 1) < 0.1,  # "/"
        np.abs(np.hypot(xx - 0.5, yy - 0.5) - 0.33) < 0.08,  # "0"
        (np.abs(xx - 0.5) < 0.1) | (np.abs(yy - 0.5) < 0.1),  # "+"
        ((np.abs(yy - 0.15) < 0.08) | (np.abs(xx - yy * 0.6 - 0.35) < 0.08)) & (yy < 0.95),  # "7"
        (np.abs(yy - 0.15) < 0.08) | (np.abs(yy - 0.85) < 0.08) | (np.abs(xx - 0.8) < 0.08),  # "3"-ish
    ]
    return np.stack([np.where(m, 1.0, -1.0) for m in masks[:n]])[..., None].astype(np.float32)


@pytest.mark.parametrize("name", ["unet", "dit", "uvit", "stem"])
def test_overfits_fixed_batch_under_eps_loss(learner, name):
    """A tiny class-conditional network memorises a fixed batch (x0, label, t, eps) of 8 images: eps-MSE falls >= 10x.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with DDPM's linear schedule
    (beta from 1e-4 to 0.02 over T = 1000, Ho et al. 2020), computed here in numpy.
    """
    T = 1000
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    rng = np.random.default_rng(0)
    x0 = digit_like_batch()
    t = rng.integers(0, T, size=8)
    eps = rng.normal(size=x0.shape).astype(np.float32)
    a = abar[t][:, None, None, None]
    x_t = jnp.asarray(np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, jnp.float32)
    t, eps = jnp.asarray(t, jnp.int32), jnp.asarray(eps)

    labels = jnp.arange(8) % 4
    model, variables = learner[name]
    params = variables["params"]
    opt = optax.adam(2e-3)
    opt_state = opt.init(params)

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x_t, t, labels) - eps) ** 2)

    @jax.jit  # fully optimised: this one runs many steps
    @ops.forced("fast")  # the XLA path: in a process that loaded the native kernels, training
    def steps(p, s):     # this far (tiny gradients) was seen to slow down hundreds of times
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss
        (p, s), losses = jax.lax.scan(body, (p, s), None, length=25)
        return p, s, losses

    losses = []
    for _ in range(12):  # at most 300 Adam steps
        params, opt_state, l = steps(params, opt_state)
        losses.extend(np.asarray(l).tolist())
        if losses[-1] < losses[0] / 20:
            break
    first = losses[0]  # loss at the initial parameters
    final = float(jit(loss_fn)(params))
    assert 0.5 < first < 2.0  # zero-initialised output: loss = mean(eps^2) ~ 1
    assert final < first / 10, (first, final, losses[::25])
