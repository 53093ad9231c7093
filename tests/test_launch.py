"""End to end through launch.py (subprocesses): the smoke config trains, leaves
checkpoints, event files, metrics.jsonl and a PNG; --mode sample works; resume
after kill -9 is exact; two processes under jax.distributed agree.

Every subprocess runs with XLA_FLAGS=--xla_backend_optimization_level=0 (compile
time dominates these tiny runs; the arithmetic is the same) and shares one
persistent compilation cache, so identical programs compile once.
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
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Runs loop.train in a subprocess, with hooks the tests need:
#   argv: workdir, mode ("plain" | "kill" | "nan"), then --config.* overrides.
# "kill": SIGKILL itself after step 4, once checkpoint 3 is finalised and the
#         save of step 4 has been started; that save's commit is made slow (a slow
#         disk), so the kill lands inside it;
# "nan":  batch 5 is made of NaNs; the expected NonFiniteError is printed as JSON;
# all modes dump this process's final params to <workdir>/params_<process>.npz.
DRIVER = r'''
import json, os, signal, sys, time
sys.path.insert(0, REPO)
import jax, numpy as np
from absl import flags
from ml_collections import config_flags
from diffusion_jax.train import loop, parallel

config_flags.DEFINE_config_file("config", SMOKE)
workdir, mode = sys.argv[1], sys.argv[2]
flags.FLAGS([sys.argv[0]] + sys.argv[3:])
config = flags.FLAGS.config

def kill_after_step_4(step, state):
    if step == 4:
        deadline = time.time() + 120
        while not os.path.isdir(os.path.join(workdir, "checkpoints", "3")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

if mode == "kill":
    import orbax.checkpoint as ocp
    save = ocp.StandardCheckpointHandler.async_save
    class SlowCommit:
        def result(self, timeout=None):
            time.sleep(60)
    async def slow_save_of_step_4(self, directory, *args, **kwargs):
        futures = await save(self, directory, *args, **kwargs)
        slow = os.path.basename(os.path.dirname(str(directory))).startswith("4.")
        return [*(futures or []), SlowCommit()] if slow else futures
    ocp.StandardCheckpointHandler.async_save = slow_save_of_step_4

if mode == "nan":
    make = loop.make_train_iterator
    class NanAtBatch5:
        def __init__(self, it):
            self.it, self.i = it, 0
        def __iter__(self):
            return self
        def __next__(self):
            batch, self.i = next(self.it), self.i + 1
            return dict(batch, image=np.full_like(batch["image"], np.nan)) if self.i == 5 else batch
        def get_state(self):
            return self.it.get_state()
        def set_state(self, state):
            self.it.set_state(state)
    make_with_nan = lambda cfg: NanAtBatch5(make(cfg))
    loop.make_train_iterator = make_with_nan
    try:
        loop.train(config, workdir)
    except loop.NonFiniteError as e:
        print("NONFINITE " + json.dumps(str(e)))
    sys.exit(0)

state = loop.train(config, workdir, step_callback=kill_after_step_4 if mode == "kill" else None)
flat = {jax.tree_util.keystr(k): v for k, v in
        jax.tree_util.tree_leaves_with_path(parallel.to_host(state.params))}
np.savez(os.path.join(workdir, f"params_{jax.process_index()}.npz"), **flat)
'''.replace("REPO", repr(REPO)).replace("SMOKE", repr(SMOKE))




def run(args, env, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def check(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, env):
    """6 straight steps of the smoke config through launch.py (checkpoints at 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("smoke"))
    check(run(["launch.py", "--config", SMOKE, "--workdir", workdir], env))
    return workdir


def restored_params(workdir, step):
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def npz_params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_params_equal(a, b, **tol):
    assert sorted(a) == sorted(b)
    for k in a:
        if tol:
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_smoke_train_leaves_outputs(smoke_run):
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(smoke_run, "checkpoints", "*")))
    assert steps == [3, 6]
    assert glob.glob(os.path.join(smoke_run, "tensorboard", "events.out.tfevents.*"))
    lines = [json.loads(l) for l in open(os.path.join(smoke_run, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [2, 4, 6]
    for l in lines:
        assert {"loss", "grad_norm", "learning_rate", "images_per_sec"} <= set(l)
        assert np.isfinite(l["loss"]) and l["grad_norm"] > 0
    # warm-up 2 steps to 1e-3, then constant: the rate used at step s is lr(s - 1)
    assert [l["learning_rate"] for l in lines] == pytest.approx([5e-4, 1e-3, 1e-3])
    from PIL import Image

    png = Image.open(os.path.join(smoke_run, "samples", "step_0000006.png"))
    # 3 classes x 2 per class, 8x8 tiles with 2-pixel padding
    assert png.size == (2 * 10 + 2, 3 * 10 + 2)
    cfg = json.load(open(os.path.join(smoke_run, "config.json")))
    assert cfg["experiment"] == "smoke"


def test_sample_mode(smoke_run, env):
    check(run(["launch.py", "--config", SMOKE, "--workdir", smoke_run, "--mode", "sample",
               "--config.sample.labels=2,0", "--config.sample.num_images=5",
               "--config.sample.batch_size=3"], env))
    (npz,) = glob.glob(os.path.join(smoke_run, "samples", "sample_step6_*.npz"))
    assert os.path.exists(npz[:-4] + ".png")
    with np.load(npz) as f:
        assert f["images"].shape == (5, 8, 8, 1) and f["images"].dtype == np.uint8
        np.testing.assert_array_equal(f["labels"], [2, 0, 2, 0, 2])


def test_resume_after_kill_is_exact(smoke_run, env, tmp_path):
    workdir = str(tmp_path / "killed")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = run([str(driver), workdir, "kill", "--config.training.checkpoint_every_steps=1"], env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "4"))  # the kill landed inside its save
    assert glob.glob(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp*"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "6"))
    check(run([str(driver), workdir, "plain", "--config.training.checkpoint_every_steps=1"], env))
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))  # cleaned
    assert_params_equal(npz_params(os.path.join(workdir, "params_0.npz")), restored_params(smoke_run, 6))


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(env, tmp_path):
    workdir = str(tmp_path / "nan")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = check(run([str(driver), workdir, "nan"], env)).stdout
    (line,) = [l for l in out.splitlines() if l.startswith("NONFINITE ")]
    message = json.loads(line[len("NONFINITE "):])
    assert "step 5" in message and "last good checkpoint: step 3" in message
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*")))
    assert steps == [3]


def test_two_processes_under_jax_distributed_agree(smoke_run, env, tmp_path):
    workdir = str(tmp_path / "dist")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), workdir, "plain", "--config.parallel.distributed=True",
             f"--config.parallel.coordinator_address=127.0.0.1:{port}",
             "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    p0 = npz_params(os.path.join(workdir, "params_0.npz"))
    p1 = npz_params(os.path.join(workdir, "params_1.npz"))
    assert_params_equal(p0, p1)
    # 2 processes x 1 device with the same global batch = the 1-device run, to float tolerance
    assert_params_equal(p0, restored_params(smoke_run, 6), rtol=1e-4, atol=1e-6)
    data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", "6", "data")))
    assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files


def test_checkpoint_of_another_model_gives_clear_error(smoke_run):
    from experiments import smoke

    from diffusion_jax.train import loop

    config = smoke.get_config()
    config.model.ch = 16
    with pytest.raises(ValueError, match=r"different model config \(model\.ch: checkpoint 8 vs config 16\)"):
        loop.train(config, smoke_run)
