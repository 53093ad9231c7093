"""FSDP (diffusion_jax.train.parallel): the sharding rule, its validation, the same losses
as data parallelism on 8 CPU devices and in two processes, and checkpoints that move
between meshes (fsdp = 4 -> fsdp = 2, and the EMA onto this process's one device).

The 8-device runs all happen in one subprocess (tests/programs/fsdp_runs.py direct).

Tolerance: the runs draw the same t, noise and label drops per example (keys by global
index) and differ only in how XLA groups the sums over devices (the batch mean, the
gradient reduction, the gathered parameters' matmuls), i.e. float32 rounding of sums of
8 rows: the losses may differ by rtol 1e-5 (test_train_step.py's bound for 1 against 8
devices; measured on 2026-12-03: equal to the last bit on this CPU). After 4 Adam steps the parameters agree to rtol 1e-4 / atol 1e-6:
Adam divides by sqrt(v) + eps, which can turn a rounding-level gradient difference of
a near-zero component into an update difference of order lr * 1e-3.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax.train import checkpoints, parallel
from diffusion_jax.train import config as config_lib
from experiments import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(REPO, "tests", "programs", "fsdp_runs.py")
LOSS_RTOL = 1e-5
PARAM_TOL = dict(rtol=1e-4, atol=1e-6)


def test_fsdp_rule_splits_the_largest_dividing_axis_and_replicates_small_arrays():
    big = parallel.FSDP_MIN_SIZE
    assert parallel.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((3, 3, 128, 64), 4) == P(None, None, "fsdp", None)
    assert parallel.fsdp_spec((6, big + 2), 4) == P()  # 4 divides neither axis: replicated
    assert parallel.fsdp_spec((8, big + 2), 4) == P("fsdp", None)  # largest axis that divides
    assert parallel.fsdp_spec((big // 2,), 2) == P()  # small: replicated
    assert parallel.fsdp_spec((big,), 2) == P("fsdp")
    assert parallel.fsdp_spec((), 8) == P()
    assert parallel.fsdp_spec((64, 128), 1) == P()  # fsdp = 1: data parallel


def test_fsdp_must_divide_the_device_count():
    config = smoke.get_config()
    config.parallel.fsdp = 3
    with pytest.raises(ValueError, match=r"^config\.parallel\.fsdp must be a divisor of the device count 8, got 3$"):
        config_lib.validate(config, num_devices=8)
    config.parallel.fsdp = 0
    with pytest.raises(ValueError, match=r"config\.parallel\.fsdp must be an integer with 1 <= fsdp"):
        config_lib.validate(config, num_devices=8)
    config.parallel.fsdp = 4
    config_lib.validate(config, num_devices=8)
    config.parallel.fsdp = 8  # --mode sample / eval on one device read the EMA whatever the mesh
    config_lib.validate(config, num_devices=1, training=False)


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def eight(env, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fsdp") / "run")
    e = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, PROGRAM, "direct", workdir], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=600)
    return _result(proc), workdir


def _assert_trees_close(got, want, **tol):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **tol)


def test_fsdp_8_gives_the_data_parallel_losses_and_splits_the_state(eight):
    """fsdp = 8 outside the trainer; fsdp = 4 and 2: the trainer's steps 1-3 and 4 in the next test."""
    res, _ = eight
    dp, r = res["dp"], res["fsdp8"]
    assert dp["sharded_leaves"] == 0
    np.testing.assert_allclose(r["losses"], dp["losses"], rtol=LOSS_RTOL)
    _assert_trees_close(r["params"], dp["params"], **PARAM_TOL)
    _assert_trees_close(r["ema"], dp["ema"], **PARAM_TOL)
    assert r["sharded_leaves"] > 0
    # device 0 holds under a quarter of the replicated state (the small arrays stay replicated)
    assert r["device0_bytes"] < dp["device0_bytes"] / 4, (r["device0_bytes"], dp["device0_bytes"])


def test_checkpoint_of_fsdp_4_resumes_at_fsdp_2_and_restores_onto_one_device(eight):
    res, workdir = eight
    dp, resumed = res["dp"], res["resumed"]
    # the trainer's losses: steps 1-3 at fsdp = 4, step 4 at fsdp = 2 from the fsdp = 4 checkpoint
    np.testing.assert_allclose([resumed["losses"][str(s)] for s in range(1, 5)], dp["losses"],
                               rtol=LOSS_RTOL)
    _assert_trees_close(resumed["params"], dp["params"], **PARAM_TOL)
    # --mode sample / eval: the EMA read onto this process's single device
    step, ema = checkpoints.restore_ema(smoke.get_config(), workdir)
    assert step == 4
    _assert_trees_close({k: np.asarray(v).tolist() for k, v in _keyed(ema).items()}, resumed["ema"],
                        rtol=0, atol=0)


def _keyed(tree):
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_fsdp_across_them_agree(eight, env, tmp_path):
    """2 processes x 2 devices, fsdp = 4: every fsdp group spans both processes."""
    res, _ = eight
    e = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
    port = _free_port()
    # output to files, not pipes: a process blocked on a full pipe stalls the other in a collective
    logs = [(open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")) for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, PROGRAM, "loop", str(tmp_path / "run"), "--config.parallel.fsdp=4",
         "--config.parallel.distributed=True", f"--config.parallel.coordinator_address=127.0.0.1:{port}",
         "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"],
        cwd=REPO, env=e, stdout=logs[i][0], stderr=logs[i][1], text=True) for i in range(2)]
    out = []
    for p, (stdout, stderr) in zip(procs, logs):
        p.wait(timeout=600)
        stdout.seek(0), stderr.seek(0)
        out.append(_result(subprocess.CompletedProcess(p.args, p.returncode, stdout.read(), stderr.read())))
        stdout.close(), stderr.close()
    first = out[0]
    assert first["sharded_leaves"] > 0
    np.testing.assert_allclose([first["losses"][str(s)] for s in range(1, 5)], res["dp"]["losses"],
                               rtol=LOSS_RTOL)
    _assert_trees_close(first["params"], res["dp"]["params"], **PARAM_TOL)
    assert out[1]["params"] == first["params"]
