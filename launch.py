"""Entry point: python launch.py --config experiments/mnist.py [--workdir DIR] [--mode train|sample|eval]

Config fields can be overridden on the command line, e.g.
`--config.training.batch_size=64 --config.sample.method=ddpm`. The logic lives
in diffusion_jax.train (train loop, sampling) and diffusion_jax.evaluation.
"""

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from diffusion_jax.ops import allocator

    # Before JAX starts its threads: XLA:CPU's per-step buffers are reused
    # instead of page-faulted in again every step (DIFFUSION_JAX_MALLOC=default opts out).
    allocator.keep_freed_memory()
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.experiment)
    logging.info("mode=%s workdir=%s", FLAGS.mode, workdir)
    from diffusion_jax.train import loop

    if FLAGS.mode == "train":
        loop.train(config, workdir, allow_config_change=FLAGS.allow_config_change)  # validates first
        return
    loop.prepare(config)  # multi-host start-up and validation before any work
    if FLAGS.mode == "sample":
        from diffusion_jax.train import sampling

        paths = sampling.run_sample_mode(config, workdir, allow_config_change=FLAGS.allow_config_change)
        logging.info("wrote %s and %s", paths["png"], paths["npz"])
    else:
        from diffusion_jax import evaluation  # imported lazily: train and sample work without it

        evaluation.evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
