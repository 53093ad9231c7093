"""python -m diffusion_jax.ops build: compile and load the native XLA:CPU kernels ahead of time.

Prints where they stand and exits non-zero when they cannot be built (the
reason names the fix: a C++ compiler, or oneDNN from the ``cpu`` extra).
"""

from absl import app, logging

from diffusion_jax.ops import native


def main(argv):
    if argv[1:] != ["build"]:
        raise app.UsageError("usage: python -m diffusion_jax.ops build")
    if not native.available():
        logging.error("native kernels unavailable: %s", native.reason())
        return 1
    logging.info("native kernels built and loaded")
    return 0


if __name__ == "__main__":
    app.run(main)
