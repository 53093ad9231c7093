"""experiments/smoke.py with only config.diffusion.process changed, for each process named in
argv: validate (which fills in the process's own prediction and loss weighting), one train
step of the smoke UNet, then every registered sampler (2 steps, config.sample's guidance and
clipping, through `sampling.make_denoiser`) with a closed-form stand-in of the network's output
(one small compile for all seven instead of seven of the UNet). Prints one line per process:
"<process> <prediction> <loss_weighting> loss=<loss> finite=<sampler>,<sampler>,...".
Run by tests/test_train_config.py::test_one_field_switches_the_formulation."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import models, samplers  # noqa: E402
from diffusion_jax.data.synthetic import SyntheticIterator  # noqa: E402
from diffusion_jax.train import config as config_lib  # noqa: E402
from diffusion_jax.train import sampling  # noqa: E402
from diffusion_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from diffusion_jax.train.step import make_train_step  # noqa: E402
from experiments import smoke  # noqa: E402


def network(config, params, cond, w):
    """A stand-in network: an output shaped like x (of the config's prediction type); h, the
    flow-map samplers' interval input, is ignored, as a network without model.interval_input does."""
    return lambda x, t, h=None: jnp.tanh(x) * params + 0.1 * jnp.reshape(jnp.asarray(t, x.dtype), (-1, 1, 1, 1))


FLOW_MAPS = ("meanflow", "shortcut")  # samplers of flow maps: the flow process only


def usable(process):
    """The registered samplers that run on `process` (all of them; the flow-map ones on flow)."""
    return [n for n in samplers.NAMES if process == "flow" or n not in FLOW_MAPS]


def main(names):
    sampling.make_denoise_fn = network  # only this program's own module state
    for process in names:
        config = smoke.get_config()
        config.diffusion.process = process
        config_lib.validate(config)
        model, proc = models.create(config.model), sampling.make_process(config)
        tx, lr = make_optimizer(config.training)
        state = jax.jit(lambda k: create_train_state(model, config.model, tx, k))(jax.random.PRNGKey(0))
        batch = next(SyntheticIterator(batch_size=4, image_shape=(8, 8, 1), num_classes=3, seed=0))
        step = jax.jit(make_train_step(config, model, proc, tx, lr))
        state, metrics = step(state, batch, jax.random.PRNGKey(1))
        checked = config.copy_and_resolve_references()
        for name in usable(process):
            checked.sample.method = name
            config_lib.validate(checked)  # each sampler's settings and grid on this process
        labels = jnp.arange(2, dtype=jnp.int32)

        @jax.jit
        def draw_all(params, key):
            denoise = sampling.make_denoiser(config, params, labels, float(config.sample.guidance_scale), proc)
            return [samplers.draw(samplers.make(name, num_steps=2), denoise, proc, (2, 8, 8, 1), key)
                    for name in usable(process)]

        xs = draw_all(jnp.float32(0.5), jax.random.PRNGKey(2))
        finite = [n for n, x in zip(usable(process), xs) if np.all(np.isfinite(np.asarray(x)))]
        d = config.diffusion
        print(f"{process} {d.prediction} {d.loss_weighting} loss={float(metrics['loss']):.4f} "
              f"finite={','.join(finite)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
