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
from pathlib import Path

import numpy as np

from heloco_p2p.fsutil import atomic_write_bytes  # a leaf utility, not a layer


def cache_dir() -> Path:
    """The cache root, read from the environment on every call (tests point it elsewhere)."""
    root = os.environ.get("HELOCO_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "heloco-p2p"


def settings_key(settings: dict) -> str:
    """A short stable hash of a JSON-able dict of build settings."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_array(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_array(path: Path) -> np.ndarray:
    """Memory-mapped, so opening a cached stream costs nothing until blocks are read."""
    return np.load(path, mmap_mode="r", allow_pickle=False)
