"""One trainer per workdir, and a record of every start.

    <workdir>/lock            {"pid", "host", "time"} of the trainer holding it
    <workdir>/restarts.jsonl  one line per start: fresh or resumed, step, versions, config changes

A second trainer stops with `WorkdirBusyError` naming the holder; a lock
left by a process that died (same host, pid no longer running) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

LOCK_FILE = "lock"
RESTARTS_FILE = "restarts.jsonl"


class WorkdirBusyError(RuntimeError):
    """Another live trainer holds the workdir's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds <workdir>/lock (created atomically with link(2))."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.record = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as held by an unknown process

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        record = dict(self.record, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic: fails if the lock exists
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                stale = (holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int)
                         and not _alive(holder["pid"]))
                if not stale:
                    who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('time')})"
                           if holder else "an unknown process (unreadable lock file)")
                    raise WorkdirBusyError(
                        f"workdir {os.path.dirname(self.path)} is in use by another trainer, {who}; "
                        f"stop it or use another --workdir (delete {self.path} if that trainer is gone)")
                os.replace(tmp, self.path)  # stale: its pid is dead on this host; take it over
                self.held = self._holder() == record
                if self.held:
                    return
            raise WorkdirBusyError(f"could not take the lock {self.path}: another trainer took it meanwhile")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def log_start(workdir: str, record: dict[str, Any]) -> None:
    """Appends one JSON line (with time, host and pid) to <workdir>/restarts.jsonl."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            "pid": os.getpid(), **record}
    with open(os.path.join(workdir, RESTARTS_FILE), "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
