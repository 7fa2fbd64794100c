"""What modeld remembers about running backends, so a restarted modeld can re-adopt them.

One small JSON file per ready backend in ``runtime_dir/state`` (tmpfs, kept across restarts
by ``RuntimeDirectoryPreserve=yes``), written atomically (temp file + rename) whenever a
backend becomes ready and removed when it goes away: a ``kill -9`` of modeld runs no exit
hook, so the files must be right at every moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackendRecord:
    model: str
    unit: str
    generation: int
    pid: int
    socket: str
    started_us: int
    load_count: int
    footprint_key: str = ""
    """The configuration the backend was started with (:func:`footprints.footprint_key`)."""


class RecordStore:
    """Reads and writes :class:`BackendRecord` files in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, unit: str) -> Path:
        return self.directory / f"{unit}.json"

    def save(self, record: BackendRecord) -> None:
        path = self._path(record.unit)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(record)))
        os.replace(temporary, path)

    def remove(self, unit: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(unit).unlink()

    def load_all(self) -> dict[str, BackendRecord]:
        """Records by unit name; unreadable files are dropped with a warning."""
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = BackendRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                log.warning("ignoring unreadable backend record %s: %s", path, err)
                path.unlink(missing_ok=True)
                continue
            records[record.unit] = record
        return records
