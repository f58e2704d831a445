"""Where the package keeps what it builds once and reuses: one cache folder for every writer.

Its own module, below everything that writes there (the embedded default's data, the tiny test pipelines), so
production code finds the folder without importing the test fixtures of :mod:`danceopd_diffusers.tiny`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$DANCEOPD_CACHE``, else ``danceopd-diffusers`` in the system's temporary folder."""
    return Path(root or os.environ.get("DANCEOPD_CACHE", Path(tempfile.gettempdir()) / "danceopd-diffusers"))
