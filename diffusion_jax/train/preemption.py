"""Stop cleanly on SIGTERM (a preemption notice) and SIGINT (Ctrl-C).

The loop asks `reached(step)` after every step; once it says True, the loop
saves a checkpoint of that step, waits for it to commit and returns.

* One process: Python handlers for SIGTERM and SIGINT set a flag; the step
  running when the signal came is finished and saved. A second SIGINT
  raises KeyboardInterrupt at once (no save).
* Several processes (jax.distributed): JAX's preemption service owns SIGTERM
  (its handler is installed by `jax.distributed.initialize`, so no Python
  handler replaces it) and `multihost_utils.reached_preemption_sync_point`
  picks one step at which every process says True, so all save the same
  step. SIGINT is forwarded to the service as a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging


class Preemption:
    """`with Preemption(distributed) as p: ... if p.reached(step): save and stop`."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.signal_name: str | None = None  # the signal that asked to stop, once one did
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a save
        self.signal_name = self.signal_name or name
        logging.warning("%s received: finishing the current step, then saving a checkpoint and stopping",
                        name)
        if self.distributed and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service syncs all processes on it

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            signums = (signal.SIGINT,) if self.distributed else (signal.SIGTERM, signal.SIGINT)
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same step on every process)."""
        if not self.distributed:
            return self.signal_name is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        return False
