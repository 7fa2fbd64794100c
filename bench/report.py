"""Printing and saving a benchmark's result (shared by the scripts in bench/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], json_path: Path | None) -> None:
    """Print ``result`` as JSON, and write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
