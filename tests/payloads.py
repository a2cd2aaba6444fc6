"""A pickle that would run code when loaded, for the tests that show nothing we load runs it."""

from __future__ import annotations

from pathlib import Path


class Payload:
    """Unpickled, it creates ``marker`` (so a test sees whether it ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
