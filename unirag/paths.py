"""Where caches and data live. Caches are outside the repo; override with environment variables."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root cache folder (UNIRAG_CACHE, else ~/.cache/unirag)."""
    root = os.environ.get("UNIRAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unirag")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir() -> Path:
    """Shared QA data (UNIRAG_DATA, else ../shared/data beside the repo)."""
    return Path(os.environ.get("UNIRAG_DATA") or REPO_ROOT.parent / "shared" / "data")
