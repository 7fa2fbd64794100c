"""Learned footprints: the peak memory each model's backends used, kept across restarts.

Owners record a footprint when a backend that served goes away (see
:meth:`modeld.supervisor.owner.ModelOwner`); admission uses it through
:func:`modeld.core.footprint.admission_need`. The file is ``footprints.json`` in modeld's
state directory (``$STATE_DIRECTORY``, set by ``StateDirectory=modeld``, else
``/var/lib/modeld``), one JSON object keyed by model name, written atomically (temp file +
rename) by the event loop's thread whenever a footprint grows, so it is right at every
moment (a ``kill -9`` runs no exit hook).

A footprint belongs to the configuration it was measured with: each carries
:func:`footprint_key`, a hash of the settings that shape a backend's memory use, and one
measured under other settings is not used. Runs under the same settings keep the highest
peak seen (admission stays on the safe side of a run that happened to touch less).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from modeld.config import ModelConfig

log = logging.getLogger(__name__)

FILE_NAME: Final = "footprints.json"
DEFAULT_STATE_DIR: Final = Path("/var/lib/modeld")


def state_directory(default: Path = DEFAULT_STATE_DIR) -> Path:
    """modeld's state directory: the first of ``$STATE_DIRECTORY`` (systemd sets it from
    ``StateDirectory=``, ``~/.local/state/modeld`` for a user unit), else ``default``
    (/var/lib/modeld; a per-user modeld passes ``$XDG_STATE_HOME/modeld``)."""
    configured = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(configured) if configured else default


def footprint_key(config: ModelConfig) -> str:
    """A hash of what shapes a backend's memory use: the backend, the model file (its path,
    not its content), ``options``, ``parallel`` and the limits (a backend under a tighter
    ``memory_max``/``memory_high`` is made to reclaim, so its peak says little about a
    looser one) and ``gpu_memory``. Scheduling settings (pins, groups, timeouts, queues,
    user, CPU weight) are left out: changing them keeps what was learned."""
    shape = {
        "backend": config.backend,
        "model": config.model,
        "options": dict(config.options),
        "parallel": config.parallel,
        "memory_max": config.memory_max,
        "memory_high": config.memory_high,
        "gpu_memory": config.gpu_memory,
    }
    text = json.dumps(shape, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Footprint:
    """The most a model's backends used under one configuration (bytes; 0: unknown)."""

    key: str
    memory_peak: int
    gpu_memory: int = 0
    """The most GPU memory NVML attributed to its backends."""

    def merge(self, other: Footprint) -> Footprint:
        """``other`` measured later: the higher figures when the keys match, else ``other``."""
        if other.key != self.key:
            return other
        return Footprint(
            self.key,
            max(self.memory_peak, other.memory_peak),
            max(self.gpu_memory, other.gpu_memory),
        )


class FootprintStore:
    """Footprints by model name, in ``directory/footprints.json`` (None: in memory only).

    A file that cannot be read starts empty and one that cannot be written keeps the
    footprints in memory, each with a warning: learned peaks only ever relax admission, so
    losing them costs nothing but that.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.path = directory / FILE_NAME if directory is not None else None
        self._footprints: dict[str, Footprint] = {}
        self._write_failed = False
        if self.path is not None:
            self._footprints = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict[str, Footprint]:
        try:
            data = json.loads(path.read_text())
            return {str(name): Footprint(**entry) for name, entry in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            log.warning("ignoring unreadable footprints %s: %s", path, err)
            return {}

    def get(self, model: str, key: str) -> Footprint | None:
        """The footprint of ``model`` measured under configuration ``key``, if any."""
        footprint = self._footprints.get(model)
        return footprint if footprint is not None and footprint.key == key else None

    def memory_peak(self, model: str, key: str) -> int:
        footprint = self.get(model, key)
        return footprint.memory_peak if footprint is not None else 0

    def learn(self, model: str, measured: Footprint) -> Footprint:
        """Merge a new measurement into ``model``'s footprint, save, and return the result."""
        old = self._footprints.get(model)
        footprint = old.merge(measured) if old is not None else measured
        if footprint != old:
            self._footprints[model] = footprint
            self._save()
        return footprint

    def _save(self) -> None:
        if self.path is None:
            return
        data = {name: asdict(f) for name, f in sorted(self._footprints.items())}
        temporary = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            temporary.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(temporary, self.path)
        except OSError as err:
            if not self._write_failed:
                log.warning("cannot save learned footprints to %s: %s", self.path, err)
            self._write_failed = True
            return
        self._write_failed = False
