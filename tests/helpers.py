"""Helpers for driving the `localtune` command in-process, as a person sees it."""

from __future__ import annotations

from localtune import cli


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
