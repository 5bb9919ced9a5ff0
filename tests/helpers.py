"""Helpers for driving the `localtune` command in-process, as a person sees it, and a
stand-in for a run's live worker."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

from localtune import cli
from localtune.runs import RunDir


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `localtune ARGV...`; return (exit code, stdout, stderr)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The single `localtune: error: ...` line a user's mistake must give, with no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("localtune: error: ")
    return lines[0]


@contextmanager
def live_worker(run: RunDir) -> Iterator[subprocess.Popen]:
    """A process that passes for the run's worker (it holds the lock and names
    `localtune.worker` and the run on its command line) and only sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "localtune.worker",
                             str(run.path)])
    try:
        run.lock_path.write_text(f"{proc.pid}\n")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def kill_after_first_checkpoint(run: RunDir, pid=None, timeout: float = 600) -> str:
    """SIGKILL a run's process once its first checkpoint is complete; return the newest
    checkpoint's name then. `pid`: a callable giving the process to kill (default: the run's
    worker); it is asked only once the checkpoint is there."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while not run.complete_checkpoints():
        assert time.time() < deadline, f"no checkpoint within {timeout} s: {run.log_path.read_text()[-2000:]}"
        time.sleep(0.2)
    target = pid() if pid is not None else run.live_worker_pid()
    assert target is not None, "no process to kill"
    os.kill(target, signal.SIGKILL)
    return run.complete_checkpoints()[-1].name
