"""Test-session settings, and the fixtures shared by the test files that start launch.py or
trainer programs as subprocesses.

Outside tests/test_ops_*.py, which call the native kernels directly, the tests trace the
pure-XLA layers (DIFFUSION_JAX_OPS=fast, inherited by every subprocess they start): on the
2-core CI machine a train step of the native path has deadlocked once in a while inside the
suite (a oneDNN thread spinning in its barrier; never seen in a run on its own), and one such
hang costs the whole CI budget. The arithmetic under test is the same on both paths
(tests/test_ops_*.py hold the native kernels to the reference).

The tests' own processes compile at XLA's backend optimisation level 1 (LLVM -O1) instead of
the default 3: most tests compile more than they run, and level 1 took 19-22% off test_models,
test_train_step, test_processes, test_objectives, test_train_step_finite and test_flow_maps
(2026-12-04, 2-core CPU, -n 0), their exact and bit-identical checks passing unchanged. The
subprocesses they start (the `env` fixture) compile at level 0: they run a few steps each.
"""

import os

import pytest

os.environ.setdefault("DIFFUSION_JAX_OPS", "fast")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts a backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()


def _run_dir(tmp_path_factory):
    """This pytest run's temporary root: under xdist, the folder its workers' basetemps share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=str(_run_dir(tmp_path_factory) / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(k, None)
    return e
