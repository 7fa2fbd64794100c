"""Reading LocalAI's ``ModelOptions`` the same way in every backend."""

from __future__ import annotations

import os
from typing import Any


def model_path(request: Any) -> str:
    """The model file of a ModelOptions: ModelFile, else Model; relative to ModelPath."""
    path: str = request.ModelFile or request.Model
    if path and request.ModelPath and not os.path.isabs(path):
        path = os.path.join(request.ModelPath, path)
    return path
