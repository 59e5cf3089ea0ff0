"""Where glmapp keeps what it builds for the user (demo checkpoints, compiled CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$GLMAPP_CACHE`, by default ~/.cache/glmapp."""
    return Path(os.environ.get("GLMAPP_CACHE", Path.home() / ".cache" / "glmapp"))
