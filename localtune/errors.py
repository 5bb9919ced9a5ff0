"""The one exception type for a user's mistake.

A `UserError` is something the person can fix (a bad file, an unknown key, a model that is
not on this machine). The CLI prints its message as one line and exits 1, with no traceback.
Anything else that escapes is our bug: the CLI prints the traceback and where the log is.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us; the message says what, where and how to fix it."""
