"""The base of the folder classes: a folder path plus a table of the names in it, so each layout is spelled once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class Layout:
    path: Path
    NAMES: ClassVar[dict[str, str]] = {}  # attribute -> path relative to the folder

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __getattr__(self, attribute: str) -> Path:
        names = type(self).NAMES
        if attribute in names:
            return self.path / names[attribute]
        raise AttributeError(f"{type(self).__name__} has no {attribute!r}")
