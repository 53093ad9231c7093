"""After a resume every step appears once: metrics.jsonl loses the lines of the
steps done again, TensorBoard is told to purge them (purge_step)."""

import json
import os
import struct

import numpy as np

from diffusion_jax.train.writers import MetricWriter


def _events(logdir):
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            out.append((name, event))
            i += 12 + n + 4
    return out


def test_resume_drops_steps_logged_after_the_checkpoint(tmp_path):
    w = MetricWriter(str(tmp_path))
    for s in (2, 4, 6):
        w.write_scalars(s, {"loss": s})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # torn by a kill
    w = MetricWriter(str(tmp_path), start_step=3)  # resumed from checkpoint 3
    for s in (4, 6):
        w.write_scalars(s, {"loss": 10 + s})
    w.close()
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [(l["step"], l["loss"]) for l in lines] == [(2, 2.0), (4, 14.0), (6, 16.0)]
    purges = [(name, e.step) for name, e in _events(tmp_path / "tensorboard")
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges and purges[-1][1] == 4  # events of step >= 4 in the earlier file are dropped


def test_fresh_start_in_a_used_workdir_starts_the_log_over(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write_scalars(2, {"loss": np.float32(1)})
    w.close()
    MetricWriter(str(tmp_path), start_step=0).close()
    assert open(tmp_path / "metrics.jsonl").read() == ""
