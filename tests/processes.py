"""What the suites that run real processes share: their environment, waiting for a condition, asking whether an
HTTP endpoint answers, and stopping a process started in its own session (start_new_session=True)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def wait_for(fn, timeout_s: float = 120.0, every_s: float = 0.2, what: str = "condition"):
    """Calls fn until it returns something true and returns that; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def answers_ok(url: str, timeout_s: float = 5.0) -> bool:
    """Whether GET url answers 200 now (False while nothing listens there yet, or it is busy starting)."""
    import requests
    try:
        return requests.get(url, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> None:
    """Sends sig to a running process; kills its whole process group if it has not exited within timeout_s."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that runs the repository's code: the repository first on
    PYTHONPATH, then what the caller's PYTHONPATH held (packages installed beside the interpreter's), then extra."""
    path = os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    return {**os.environ, "PYTHONPATH": path, **extra}
