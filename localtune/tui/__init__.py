"""The terminal UI (Textual): `localtune` with no arguments.

Screens (one module each under `screens/`): Machine, New run, Runs (the three top-level
modes, keys 1 2 3), and per run the Dashboard, Export and Chat. Styles live in `styles.tcss`.
The TUI only reads and renders: planning, launching, stopping and exporting are the core
functions the CLI uses too, and training runs in its own worker process, which outlives the TUI.
"""

from __future__ import annotations


def run_tui(*, run: str | None = None) -> int:
    """Run the app until the person quits; `run` (an id, prefix, `last` or path) opens on that
    run's dashboard. A run that does not exist is refused here, before the screen changes."""
    from localtune.tui.app import LocaltuneApp

    if run is not None:
        from localtune.runs import find_run

        run = str(find_run(run).path)  # UserError: one line from the CLI
    app = LocaltuneApp(open_run=run)
    app.run()
    if app._exception is not None:  # Textual has shown the traceback; the CLI saves a copy
        from localtune.cli import TUICrashed

        raise TUICrashed(str(app._exception)) from app._exception
    return app.return_code or 0
