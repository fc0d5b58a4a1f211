"""Fingerprints: short hashes that say whether two things are the same bytes, the same JSON value
or the same image folder. Cache keys, the report's ``fingerprints`` and ``compress compare`` use
these; nothing else hashes files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def update_with_file(h: Any, path: Path) -> None:
    """Feed a file's bytes into the hash ``h`` in 1 MiB chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)


def file_fingerprint(path: Path) -> str | None:
    """sha256 (32 hex digits) of a model file's bytes, and of an ONNX external-data file beside it."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    for f in [path, *sorted(path.parent.glob(path.name + ".data"))]:
        update_with_file(h, f)
    return h.hexdigest()[:32]


def files_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 (32 hex digits) of several files' names and bytes, in the order given: two engines
    whose model files are the same bytes get the same value."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        update_with_file(h, Path(p))
    return h.hexdigest()[:32]


def first_difference(recorded: dict[str, Any], current: dict[str, Any],
                     keys: Iterable[str]) -> tuple[str, Any, Any] | None:
    """The first of ``keys`` whose fingerprint differs between two reports' ``fingerprints`` (or what
    is at hand now): (key, recorded, current); None when all agree. A run is comparable with another,
    or explainable with a model and data, only where the source model and images are the same."""
    for key in keys:
        if recorded.get(key) != current.get(key):
            return key, recorded.get(key), current.get(key)
    return None


def json_fingerprint(value: Any) -> str:
    """sha256 (32 hex digits) of a JSON value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def image_folder_fingerprint(listing: Iterable[tuple[str, str, int]], sample: Iterable[Path]) -> str:
    """16 hex digits for an image folder from its (class, file name, size) listing, in order, and
    the bytes of a sample of its files. Modification times are left out: a fresh copy of the same
    tree gives the same fingerprint (else every cache would miss and two runs on the same images
    would look calibrated on different data), and it stays cheap on 50,000 files."""
    h = hashlib.sha256()
    for cls, name, size in listing:
        h.update(f"{cls}/{name}:{size}\n".encode())
    for path in sample:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()[:16]
