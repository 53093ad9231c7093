"""SIGTERM / SIGINT: the running step is finished and saved, the process exits
cleanly, and a restart continues from exactly that step (subprocesses, the
smoke config, one process and two processes under jax.distributed on CPU).

Compile time dominates these tiny runs: every subprocess runs with
--xla_backend_optimization_level=0 and shares one persistent compilation cache.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "smoke.py")

# argv: workdir, signal name ("none" | "SIGTERM" | "SIGINT"), step to signal at, then --config.* flags.
# The signal is sent to this process from the step callback of that step (on process 0 only);
# prints "DONE <step the returned state is at>" and dumps the params to params_<process>.npz.
DRIVER = r'''
import os, signal, sys, time
sys.path.insert(0, REPO)
import jax, numpy as np
from absl import flags, logging
from ml_collections import config_flags
from diffusion_jax.train import loop, parallel

config_flags.DEFINE_config_file("config", SMOKE)
workdir, sig, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
hook = os.environ.get("DRIVER_HOOK", "")
flags.FLAGS([sys.argv[0]] + sys.argv[4:])
logging.set_verbosity(logging.INFO)

def send(step, state):
    print(f"STEP {step}", flush=True)
    if hook == "failing_save_of_step_3" and step == 3:
        time.sleep(3)  # a long step: the failing commit of checkpoint 3 is over before step 4
    if sig != "none" and step == at and jax.process_index() == 0:
        os.kill(os.getpid(), getattr(signal, sig))

if hook == "failing_save_of_step_3":  # the background commit of checkpoint 3 fails
    import orbax.checkpoint as ocp
    save = ocp.StandardCheckpointHandler.async_save
    class FailingCommit:
        def result(self, timeout=None):
            raise OSError("disk full (simulated)")
    async def failing(self, directory, *args, **kwargs):
        futures = await save(self, directory, *args, **kwargs)
        bad = os.path.basename(os.path.dirname(str(directory))).startswith("3.")
        return [*(futures or []), FailingCommit()] if bad else futures
    ocp.StandardCheckpointHandler.async_save = failing
try:
    state = loop.train(flags.FLAGS.config, workdir, step_callback=send)
except loop.checkpoints.CheckpointSaveError as e:
    print("ERROR " + type(e).__name__ + " " + str(e), flush=True)
    sys.exit(0)
step = int(parallel.to_host(state.step))
flat = {jax.tree_util.keystr(k): v for k, v in
        jax.tree_util.tree_leaves_with_path(parallel.to_host(state.params))}
np.savez(os.path.join(workdir, f"params_{jax.process_index()}.npz"), **flat)
print(f"DONE {step}", flush=True)
'''.replace("REPO", repr(REPO)).replace("SMOKE", repr(SMOKE))




@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return str(path)


def run(driver, env, workdir, sig="none", at=0, *flags, hook=""):
    proc = subprocess.run([sys.executable, driver, workdir, sig, str(at), *flags], cwd=REPO,
                          env=dict(env, DRIVER_HOOK=hook), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if hook:
        return proc.stdout
    (done,) = [int(l.split()[1]) for l in proc.stdout.splitlines() if l.startswith("DONE ")]
    return done, proc.stderr


def steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                  if os.path.basename(p).isdigit())


def params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_params_equal(a, b, **tol):
    assert sorted(a) == sorted(b)
    for k in a:
        (np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol) if tol
         else np.testing.assert_array_equal(a[k], b[k], err_msg=k))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, driver, env):
    """Final params of 6 straight steps (checkpoints at 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    assert run(driver, env, workdir)[0] == 6
    return params(os.path.join(workdir, "params_0.npz"))


def test_sigterm_saves_the_current_step_and_resume_is_exact(uninterrupted, driver, env, tmp_path):
    workdir = str(tmp_path / "run")
    done, err = run(driver, env, workdir, "SIGTERM", 4)
    assert done == 4 and steps(workdir) == [3, 4]  # 4 is not a checkpoint step: saved for the signal
    assert "SIGTERM: stopped after step 4 of 6; checkpoint 4 is saved in" in err
    assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))] == [2, 4]
    # restart, with a bookkeeping field changed: it continues from step 4 to 6
    done, err = run(driver, env, workdir, "none", 0, "--config.sample.num_images=5")
    assert done == 6 and "resumed from step 4" in err
    assert_params_equal(params(os.path.join(workdir, "params_0.npz")), uninterrupted)
    assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))] == [2, 4, 6]
    assert json.load(open(os.path.join(workdir, "config.json")))["sample"]["num_images"] == 6  # the original
    starts = [json.loads(l) for l in open(os.path.join(workdir, "restarts.jsonl"))]
    assert [s["resumed_from"] for s in starts] == [None, 4]
    assert not os.path.exists(os.path.join(workdir, "lock"))


def test_sigint_saves_the_current_step(driver, env, tmp_path):
    workdir = str(tmp_path / "run")
    done, err = run(driver, env, workdir, "SIGINT", 2)
    assert done == 2 and steps(workdir) == [2]
    assert "SIGINT: stopped after step 2 of 6; checkpoint 2 is saved in" in err


def test_changed_config_stops_the_resume_before_any_work(driver, env, tmp_path):
    workdir = str(tmp_path / "run")
    run(driver, env, workdir, "SIGTERM", 1)
    proc = subprocess.run([sys.executable, driver, workdir, "none", "0", "--config.diffusion.prediction=v"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert ("diffusion.prediction: checkpoint 'eps' vs config 'v'" in proc.stderr
            and "--allow_config_change" in proc.stderr)
    assert steps(workdir) == [1]


def test_failed_background_save_stops_the_run_at_the_next_step(driver, env, tmp_path):
    workdir = str(tmp_path / "run")
    out = run(driver, env, workdir, hook="failing_save_of_step_3").splitlines()
    (error,) = [l for l in out if l.startswith("ERROR ")]
    assert error.startswith("ERROR CheckpointSaveError saving checkpoint 3 in ")
    assert "failed (OSError: disk full (simulated))" in error
    # raised during step 4 (its callback never ran), not at the next save (step 6)
    assert [l for l in out if l.startswith("STEP ")][-1] == "STEP 3"
    assert steps(workdir) == []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(driver, env, workdir, sig="none", at=0):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, driver, workdir, sig, str(at), "--config.parallel.distributed=True",
             f"--config.parallel.coordinator_address=127.0.0.1:{port}",
             "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        done.append([int(l.split()[1]) for l in out.splitlines() if l.startswith("DONE ")][0])
    return done, err


def test_two_processes_stop_at_the_same_step_on_sigterm_to_one(uninterrupted, driver, env, tmp_path):
    workdir = str(tmp_path / "dist")
    (d0, d1), _ = _run_two(driver, env, workdir, "SIGTERM", 2)  # only process 0 gets the signal
    assert d0 == d1 and 2 <= d0 < 6
    assert steps(workdir) == ([3] if d0 == 3 else [3, d0] if d0 > 3 else [d0])
    data = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", str(d0), "data"))
                  if f.startswith("process_"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
    (e0, e1), _ = _run_two(driver, env, workdir)
    assert e0 == e1 == 6
    p0 = params(os.path.join(workdir, "params_0.npz"))
    assert_params_equal(p0, params(os.path.join(workdir, "params_1.npz")))
    assert_params_equal(p0, uninterrupted, rtol=1e-4, atol=1e-6)
