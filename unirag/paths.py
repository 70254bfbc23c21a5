"""Where caches and data live, and how files are written: atomically (a killed run never leaves half a file) and
checked by checksum. Caches are outside the repo; override with environment variables."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root cache folder (UNIRAG_CACHE, else ~/.cache/unirag)."""
    root = os.environ.get("UNIRAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unirag")
    from unirag.errors import UniragError

    path = Path(root)
    if path.exists() and not path.is_dir():
        raise UniragError(f"The cache folder {path} (UNIRAG_CACHE) is a file; point UNIRAG_CACHE at a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a folder inside a file, or no write permission: one line, not a traceback
        raise UniragError(f"The cache folder {path} (UNIRAG_CACHE) cannot be created ({exc.strerror}); point "
                          "UNIRAG_CACHE at a writable folder.") from None
    return path


def shared_data_dir() -> Path:
    """The shared QA data beside the repo (with train.jsonl): present on dev machines and in CI, not on a Space."""
    return REPO_ROOT.parent / "shared" / "data"


def bundled_data_dir() -> Path:
    """The corpora and dev questions shipped in the repo (data/SOURCES.md): what a Space or a fresh clone has."""
    return REPO_ROOT / "data"


def default_data_dir() -> Path:
    """UNIRAG_DATA, else ../shared/data when it exists (it has the training questions too), else the repo's data/."""
    if env := os.environ.get("UNIRAG_DATA"):
        return Path(env)
    shared = shared_data_dir()
    return shared if shared.is_dir() else bundled_data_dir()


def write_json_atomic(path: str | Path, blob: object, indent: int | None = None) -> None:
    """JSON through a temporary sibling and os.replace: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(blob, ensure_ascii=False, indent=indent), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
