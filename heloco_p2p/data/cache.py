"""The on-disk cache: ``$HELOCO_CACHE_DIR`` or ``~/.cache/heloco-p2p``.

Everything in it is derived data (tokenizers, token arrays) keyed by what it was built from, so
deleting it is always safe. Writes are atomic (temporary file beside the target, then
``os.replace``): concurrent builders of the same entry each write a complete file and the last
rename wins, and a reader never sees a torn file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """The cache root, read from the environment on every call (tests point it elsewhere)."""
    root = os.environ.get("HELOCO_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "heloco-p2p"


def settings_key(settings: dict) -> str:
    """A short stable hash of a JSON-able dict of build settings."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache entries are ordinary files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_array(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_array(path: Path) -> np.ndarray:
    """Memory-mapped, so opening a cached stream costs nothing until blocks are read."""
    return np.load(path, mmap_mode="r", allow_pickle=False)
