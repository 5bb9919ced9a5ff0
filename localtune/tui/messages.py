"""Messages posted from background threads to the screens (threads never touch widgets)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class EventsRead(Message):
    """New events from a run's events.jsonl, plus the run's state as the reader last saw it."""

    def __init__(self, events: list[dict[str, Any]], state: str, status: dict[str, Any]) -> None:
        super().__init__()
        self.events, self.state, self.status = events, state, status
