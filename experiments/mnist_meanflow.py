"""MNIST, class-conditional, one network call per image: MeanFlow (Geng et al. 2025) on the flow
process x_t = (1 - t) x0 + t eps, trained from scratch (issue #23).

The UNet of experiments/mnist.py (0.72M parameters) with a second time input, the interval
h = t - r (model.interval_input), learns the average velocity u(x_t, r, t) over [r, t]
(diffusion_jax/flow_maps.py): u_tgt = v - (t - r) du/dt by a JVP on a quarter of each batch
(the paper's ImageNet ratio), flow matching (r = t) on the rest, with two changes from the
paper's ImageNet settings: the JVP's x-tangent is the network's own velocity u(x_t, t, t)
(improved MeanFlow, Geng et al. 2025b) and (t, r) are two uniform draws, not logit-normal
(-0.4, 1.0) ones, so that one call's interval [0, 1] is trained. Adaptive weight
1 / (||du||^2 + 0.01) (p = 1); t and t - r enter the network unscaled (flow.time_scale = 1).
Guidance is trained into the target (omega = 1.5), so a guided sample costs one network call:
`--mode sample` draws x0 = x_1 - u(x_1, 0, 1) (sampler "meanflow", 1 step);
`--config.sample.num_steps=2` (or 4) for 2 (4) calls. The DiT instead of the UNet:
experiments/mnist_meanflow_dit.py (half the step time, slower per second of training).

Measured: docs/flow_maps.md ("The improved MeanFlow tangent and uniform (t, r)", 2026-12-04,
the project's classifier, N = 1,000). Train, sample and evaluate:

    python launch.py --config experiments/mnist_meanflow.py
    python launch.py --config experiments/mnist_meanflow.py --mode sample   # 1 call per image
    python launch.py --config experiments/mnist_meanflow.py --mode eval \
        --config.eval.parts="('quality',)" --config.eval.num_samples=1000 --config.eval.batch_size=500
"""

from experiments import mnist_flow


def get_config():
    config = mnist_flow.get_config()
    config.experiment = "mnist_meanflow"
    config.model.interval_input = True  # the interval t - r: its own sinusoidal embedding, added to t's

    d = config.diffusion
    d.objective = "meanflow"
    # (t, r): the larger and the smaller of two uniform draws on [0, 1]. One call evaluates
    # u(x_1, 0, 1): two logit-normal (-0.4, 1) draws almost never train t near 1 and r near 0 (both
    # beyond 0.9 / under 0.1 about once in 3,000 pairs), two uniform ones once in 50. At 1,800 steps
    # of 2,700: one call 2.65x the floor against 4.1x, two calls 1.82x against 1.59x (u2, u1;
    # docs/flow_maps.md, "The improved MeanFlow tangent and uniform (t, r)")
    d.flow.t_sampling = "uniform"
    # t and t - r enter the sinusoidal embeddings unscaled (as in SiT and MeanFlow's code): at the
    # flow default of 1000 t the embedding's top frequency makes du/dt ~1000x larger at
    # initialisation and the JVP target diverged (a tiny UNet's error grew 100x in 300 steps,
    # against a 24x fall at 1.0; tests/test_flow_maps.py)
    d.flow.time_scale = 1.0
    m = d.meanflow
    m.ratio = 0.25  # r != t on a quarter of the batch (the JVP's share)
    # the JVP's x-tangent: the network's own velocity u(x_t, t, t) (improved MeanFlow), not eps - x0,
    # whose noise the Jacobian carries into the target: at 900 steps one call 8.6x the floor where
    # the conditional tangent needed 1,400 steps for 9.0x (docs/flow_maps.md)
    m.tangent = "predicted"
    m.norm_p = 1.0
    m.norm_eps = 0.01
    m.omega = 1.5  # guidance in the target: v_g = 1.5 v - 0.5 u(x_t, t, t | null)
    m.kappa = 0.0

    t = config.training
    # the goal run from a fresh clone (2026-12-04, 2-core VM, 1.6-1.9 steps/s): 2,400 steps with
    # MNIST preparation, the kernel build and the grid took 24 min 45 s (docs/flow_maps.md)
    t.num_steps = 2400
    t.sample_every_steps = 2400  # the last step only

    s = config.sample
    s.method = "meanflow"
    s.num_steps = 1  # one network call per image
    s.grid = ""  # the sampler's own: uniform steps from t = 1
    s.guidance_scale = 0.0  # guidance is in the network (omega above); w > 0 would add a second pass

    e = config.eval  # the sweep of #23: 1, 2 and 4 calls, no sampling-time guidance
    e.samplers = ("meanflow",)
    e.steps = (1, 2, 4)
    e.guidance_scales = (0.0,)
    e.guidance_sampler = "meanflow"
    e.guidance_steps = 1
    e.strip_sampler = "meanflow"
    e.strip_steps = 4
    return config
