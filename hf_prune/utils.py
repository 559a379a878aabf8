"""JSON round trip shared by the plain-data classes (PruningConfig, PruningPlan)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from typing_extensions import Self


class JsonMixin:
    """``to_json``/``from_json`` on top of a class's ``to_dict``/``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> Self:
        """From JSON text or from a file holding it."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))
