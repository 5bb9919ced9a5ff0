"""Telling a person that a run ended, for runs that go on overnight (`--notify`).

The worker sends a desktop notification when a run finishes or fails: `notify-send` where it
is installed (Linux desktops), `osascript` on macOS, nothing elsewhere (a missing notifier is
not an error). The terminal bell is the headless view's part (it owns the terminal; the
worker has none).
"""

from __future__ import annotations

import shutil
import subprocess
import sys


def desktop_notify(title: str, body: str) -> str | None:
    """Show a desktop notification; return the tool used, or None where there is none.
    Never raises: a notification is a courtesy, not part of the run."""
    try:
        if shutil.which("notify-send"):
            subprocess.run(["notify-send", "--app-name=localtune", title, body], timeout=10,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return "notify-send"
        if sys.platform == "darwin" and shutil.which("osascript"):
            script = f"display notification {_applescript_str(body)} with title {_applescript_str(title)}"
            subprocess.run(["osascript", "-e", script], timeout=10,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return "osascript"
    except (OSError, subprocess.SubprocessError):
        return None
    return None


def _applescript_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
