"""Entry point: python launch.py --config experiments/mnist.py [--workdir DIR] [--mode train|sample|eval]

Config fields can be overridden on the command line, e.g.
`--config.training.batch_size=64 --config.sample.method=ddpm`. The logic lives
in diffusion_jax.train (train loop, sampling) and diffusion_jax.evaluation.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiments/<name>.py holding get_config()",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (default: runs/<config.experiment>)")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"],
                  "train (resumes from the workdir's latest checkpoint), sample (EMA grid + .npz) "
                  "or eval (diffusion_jax.evaluation)")
flags.DEFINE_bool("allow_config_change", False,
                  "resume although the config changed since the checkpoint in a field that changes "
                  "what the network learns or how (the changes are logged)")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
_LIBRARIES = ("orbax", "etils", "jax")  # their INFO lines are internals (hundreds per run)


class _QuietLibraries(std_logging.Filter):
    """Drops INFO and DEBUG records that orbax, etils and jax log, through absl or their own loggers."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        path = record.pathname.replace(os.sep, "/")
        return not (record.name.split(".")[0] in _LIBRARIES
                    or any(f"/{lib}/" in path for lib in _LIBRARIES))


def quiet_libraries() -> None:
    """Library internals at WARNING unless --verbosity asks for more (e.g. --verbosity=1)."""
    if FLAGS.verbosity >= 1:
        return
    for name in _LIBRARIES:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietLibraries())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_libraries()
    from diffusion_jax.ops import allocator

    # Before JAX starts its threads: XLA:CPU's per-step buffers are reused
    # instead of page-faulted in again every step (CPU runs only; DIFFUSION_JAX_MALLOC=default opts out).
    allocator.keep_freed_memory()
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.experiment)
    logging.info("mode=%s workdir=%s", FLAGS.mode, workdir)
    from diffusion_jax.train import loop

    if FLAGS.mode == "train":
        loop.train(config, workdir, allow_config_change=FLAGS.allow_config_change)  # validates first
        logging.info("done: train in %s", workdir)
        return
    loop.prepare(config, training=False)  # multi-host start-up and validation before any work
    from diffusion_jax import ops

    ops.prepare()  # kernels chosen and built before anything is jitted
    if FLAGS.mode == "sample":
        from diffusion_jax.train import sampling

        paths = sampling.run_sample_mode(config, workdir, allow_config_change=FLAGS.allow_config_change)
        logging.info("wrote %s and %s", paths["png"], paths["npz"])
    else:
        from diffusion_jax import evaluation  # imported lazily: train and sample work without it

        evaluation.evaluate(config, workdir)
    logging.info("done: %s in %s", FLAGS.mode, workdir)


if __name__ == "__main__":
    app.run(main)
