"""One trainer per workdir: a live holder's lock stops a second trainer with
its pid and host; a lock of a dead process on this host is taken over. The
trainer's start-up: kernels chosen while the data is prepared, their error stops the run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from diffusion_jax.train.workdir import LOCK_FILE, WorkdirBusyError, WorkdirLock, log_start


def _plant(tmp_path, pid, host=None):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                  "time": "2026-01-01T00:00:00Z"}))


def test_live_holder_stops_a_second_trainer(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path, holder.pid)
        with pytest.raises(WorkdirBusyError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        text = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in text and "\n" not in text
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_lock_held_in_this_process_refuses_another(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(tmp_path, dead.pid)
    with WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    _plant(tmp_path, 1, host="some-other-host")
    with pytest.raises(WorkdirBusyError, match="pid 1 on host some-other-host"):
        WorkdirLock(str(tmp_path)).acquire()


def test_every_start_is_recorded(tmp_path):
    log_start(str(tmp_path), {"resumed_from": None})
    log_start(str(tmp_path), {"resumed_from": 3})
    lines = [json.loads(l) for l in open(tmp_path / "restarts.jsonl")]
    assert [l["resumed_from"] for l in lines] == [None, 3] and lines[0]["pid"] == os.getpid()


def test_second_trainer_in_a_busy_workdir_stops_before_any_work(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import smoke

    from diffusion_jax.train import loop

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path, holder.pid)
        with pytest.raises(WorkdirBusyError, match=f"in use by another trainer, pid {holder.pid}"):
            loop.train(smoke.get_config(), str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # no checkpoints, logs or config.json
    finally:
        holder.kill()
        holder.wait()


def _smoke_train_with(monkeypatch, tmp_path, prepare):
    """loop.train of the smoke config (2 steps) with `prepare(real_prepare, data_started)` as ops.prepare."""
    import threading

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import smoke

    from diffusion_jax import ops
    from diffusion_jax.train import loop

    data_started = threading.Event()
    real_iterator, real_prepare = loop.make_train_iterator, ops.prepare

    def iterator(config):
        data_started.set()
        return real_iterator(config)

    monkeypatch.setattr(loop, "make_train_iterator", iterator)
    monkeypatch.setattr(ops, "prepare", lambda *a, **k: prepare(real_prepare, data_started))
    config = smoke.get_config()
    config.training.num_steps = 2
    return loop.train(config, str(tmp_path))


def test_the_kernels_are_chosen_while_the_data_is_prepared(monkeypatch, tmp_path):
    """On a fresh machine the kernel build (a compiler) and the data preparation (a download and
    tfds' writer) overlap: ops.prepare waits here until the data iterator is being made, which
    deadlocks into the timeout if the trainer ran them one after the other."""
    seen = []

    def prepare(real_prepare, data_started):
        if not data_started.wait(timeout=20):
            raise AssertionError("the data iterator was not started while the kernels were being chosen")
        seen.append(real_prepare())
        return seen[-1]

    state = _smoke_train_with(monkeypatch, tmp_path, prepare)
    assert int(state.step) == 2 and seen == ["fast"]  # conftest: DIFFUSION_JAX_OPS=fast


def test_a_failure_choosing_the_kernels_stops_the_run_before_any_step(monkeypatch, tmp_path):
    def prepare(real_prepare, data_started):
        raise ValueError("DIFFUSION_JAX_OPS / ops mode must be one of ('auto', ...), got 'bogus'")

    with pytest.raises(ValueError, match="got 'bogus'"):
        _smoke_train_with(monkeypatch, tmp_path, prepare)
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
