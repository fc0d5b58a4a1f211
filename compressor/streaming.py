"""Images that stream: a split is read in batches, decoded in worker processes, never held whole.

An :class:`ImageSet` names images of one split (an :class:`~compressor.image_source.ImageSource`) at the
model's input size, decoded as the model's :class:`~compressor.artifact.Preprocessing` (its ``view``)
says, optionally preprocessed into the model's float32 input. It reads them

- in batches, in a fixed order (:meth:`ImageSet.batches`): a torch ``DataLoader`` over chunks of
  indices, whose worker processes decode each chunk with ``ImageSource.load_images`` (the view's
  colour and geometry flow through it); no workers where the split is in memory or the set is small;
- or by position (``images[i : i + 64]``, ``images[ix]``), as arrays are, for the code that slices.

Decoded uint8 images can be kept on disk (:class:`Store`): one ``.npy`` file per split (or selection
of a split), size and view, in ``$COMPRESSOR_DATA_DIR/decoded`` (default
``~/.cache/compressor/data/decoded``), written once, through :func:`compressor.staging.staged_file`
(a killed run leaves no half-written store), and read back in chunks with plain reads: nothing is
mapped, so reading a store adds nothing to the resident set. Every pass and engine of a run, and
later runs, read the same store. The stores' total size is capped (``COMPRESSOR_DECODED_CACHE_BYTES``,
default 20 GB; 0 turns stores off): the least recently used stores go first, and a set that would not
fit even then is decoded on every pass, with one log line that says so.

Peak memory is a few batches, whatever the number of images.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Preprocessing
from .image_source import ImageSource, _cache_root, as_preprocessing, preprocess, view_key
from .preprocessing import channels
from .staging import OutputError, staged_file

log = logging.getLogger(__name__)

MIN_WORKER_IMAGES = 256
"""a pass over fewer images is decoded in this process (starting workers costs more)"""
MAX_WORKERS = 8
MIN_STORE_IMAGES = 256
"""fewer images are not worth a store on disk: they are decoded again each time"""
STORE_SHARE = 0.5
"""a set written through to its base's store must cover at least this share of the base"""
FILL_SHARE = 0.25
"""after a pass, a store missing at most this share of its rows is completed (e.g. the training split
less its validation images and the partial last batch) so that it can be kept"""
DEFAULT_CACHE_BYTES = 20 * 10**9
FREE_DISK_MARGIN = 2 * 2**30
"""a store is not written where it would leave less than this free on its file system"""
CACHE_ENV = "COMPRESSOR_DECODED_CACHE_BYTES"
WORKERS_ENV = "COMPRESSOR_DATA_WORKERS"


# ---------------------------------------------------------------------- settings


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise ValueError(f"{CACHE_ENV}={text!r}: a size in bytes (e.g. 8G, 500M, 0)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m[2].lower()]
    return int(float(m[1]) * scale)


def cache_cap() -> int:
    """The most bytes decoded-image stores may take together (0: no stores)."""
    text = os.environ.get(CACHE_ENV)
    if not text:
        return DEFAULT_CACHE_BYTES
    try:
        return _parse_bytes(text)
    except ValueError as exc:
        log.warning("%s: decoded-image stores use the default cap of %s", exc, _size(DEFAULT_CACHE_BYTES))
        return DEFAULT_CACHE_BYTES


def cache_dir() -> Path:
    return _cache_root() / "decoded"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(images: int, in_memory: bool) -> int:
    """Decoding processes for a pass over ``images`` images: one per core (at most MAX_WORKERS), none
    where the split is in memory or the pass is small; ``COMPRESSOR_DATA_WORKERS`` overrides."""
    text = os.environ.get(WORKERS_ENV)
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            log.warning("%s=%r is not a number of processes: ignored", WORKERS_ENV, text)
    if in_memory or images < MIN_WORKER_IMAGES:
        return 0
    return max(1, min(MAX_WORKERS, available_cores()))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------- stores on disk


class Store:
    """A complete store: uint8 images (N, H, W, C) in a ``.npy`` file, read by rows with plain reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{path} is not a decoded-image store")
        self.shape: tuple[int, int, int, int] = tuple(int(d) for d in shape)  # type: ignore[assignment]
        self.row_bytes = int(np.prod(self.shape[1:]))
        if path.stat().st_size != self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{path} has the wrong size for its header")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows`` (in that order): one read per run of consecutive rows."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        if not len(rows):
            return out
        flat = memoryview(out.reshape(len(rows), -1))
        with open(self.path, "rb", buffering=0) as fh:
            for start, stop in _runs(rows):
                fh.seek(self.offset + int(rows[start]) * self.row_bytes)
                view = flat[start:stop].cast("B")
                got = fh.readinto(view)
                while got < len(view):  # a short read: go on from there
                    more = fh.readinto(view[got:])
                    if not more:
                        raise OSError(f"{self.path} ends early")
                    got += more
        return out


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) positions of the runs of consecutive values in ``rows``."""
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    yield from zip(edges[:-1], edges[1:])


class _Abandoned(Exception):
    """A store left incomplete: its staging file is removed."""


class Writer:
    """A store being written: a staged ``.npy`` filled in any order (by this process or its decoding
    workers), renamed into place once every row is written, removed if the process ends first."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, tuple(int(d) for d in shape)
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._stage = staged_file(path, what="decoded-image store")
        self.tmp = self._stage.__enter__()
        try:
            with open(self.tmp, "wb") as fh:
                np.lib.format.write_array_header_2_0(
                    fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                         "shape": self.shape})
                self.offset = fh.tell()
                fh.truncate(self.offset + self.shape[0] * self.row_bytes)
        except BaseException as exc:
            self._stage.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self.filled = np.zeros(self.shape[0], bool)
        self.open = True
        self.started = time.perf_counter()

    def __getstate__(self) -> dict[str, Any]:
        """What a decoding worker needs to write rows (it never commits nor discards)."""
        return {"path": self.path, "shape": self.shape, "row_bytes": self.row_bytes, "tmp": self.tmp,
                "offset": self.offset, "open": self.open, "started": self.started,
                "filled": np.zeros(0, bool), "_stage": None}

    def write(self, rows: np.ndarray, images: np.ndarray) -> bool:
        """Write ``images`` at ``rows`` (any process); False where the disk refused (the store is then dropped)."""
        rows = np.asarray(rows, np.int64)
        images = np.ascontiguousarray(images, np.uint8).reshape(len(rows), -1)
        try:
            fd = os.open(self.tmp, os.O_WRONLY)
        except OSError:
            return False
        try:
            for start, stop in _runs(rows):
                data = memoryview(images[start:stop]).cast("B")
                at = self.offset + int(rows[start]) * self.row_bytes
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], at + done)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def mark(self, rows: np.ndarray) -> None:
        self.filled[np.asarray(rows, np.int64)] = True

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.filled)

    def commit(self) -> bool:
        """Rename the store into place if every row is written; True when it was."""
        if not self.open or not self.filled.all():
            return False
        self.open = False
        _WRITERS.pop(str(self.path), None)
        try:
            self._stage.__exit__(None, None, None)
        except OutputError as exc:
            log.warning("%s", exc.one_line())
            return False
        log.info("decoded-image store written: %d images at %dx%d, %s, in %.1f s (%s)", self.shape[0],
                 self.shape[1], self.shape[2], _size(self.offset + self.shape[0] * self.row_bytes),
                 time.perf_counter() - self.started, self.path.name)
        return True

    def discard(self) -> None:
        if not self.open:
            return
        self.open = False
        _WRITERS.pop(str(self.path), None)
        exc = _Abandoned()
        self._stage.__exit__(_Abandoned, exc, None)


_WRITERS: dict[str, Writer] = {}
"""stores being written by this process, by path: every set of the same store writes into the one writer"""
_IN_USE: set[str] = set()
"""stores this process has read or written: never evicted by it"""
_WARNED: set[str] = set()


@atexit.register
def _discard_writers() -> None:
    for w in list(_WRITERS.values()):
        w.discard()


def _open_store(path: Path, shape: tuple[int, ...] | None = None) -> Store | None:
    if not path.is_file():
        return None
    try:
        store = Store(path)
    except (OSError, ValueError, SyntaxError) as exc:
        log.debug("decoded-image store %s unusable: %s", path, exc)
        return None
    if shape is not None and store.shape[: len(shape)] != tuple(shape):
        return None
    if str(path) not in _IN_USE:
        _IN_USE.add(str(path))
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
    return store


def _make_room(path: Path, nbytes: int, what: str) -> bool:
    """Whether a store of ``nbytes`` may be written at ``path``: within the cap once the least recently
    used stores (none this process uses) are removed, and leaving FREE_DISK_MARGIN free on the disk."""
    cap = cache_cap()
    key = str(path)
    if cap <= 0 or key in _WARNED:  # no stores, or this one refused already
        return False

    def refuse(why: str) -> bool:
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("decoded-image store: %s take %s, %s: they are decoded again on every pass", what,
                        _size(nbytes), why)
        return False

    if nbytes > cap:
        return refuse(f"over the cap of {_size(cap)} ({CACHE_ENV})")
    root = path.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        stores = []
        for entry in os.scandir(root):
            if entry.is_file() and entry.name.endswith(".npy"):
                st = entry.stat()
                stores.append((st.st_mtime, st.st_size, Path(entry.path)))
        total = sum(s for _, s, _ in stores)
        for _, size, old in sorted(stores):
            if total + nbytes <= cap:
                break
            if str(old) in _IN_USE:
                continue
            old.unlink(missing_ok=True)
            total -= size
            log.info("decoded-image store %s removed (least recently used; the stores' cap is %s)", old.name,
                     _size(cap))
        if total + nbytes > cap:
            return refuse(f"more than the {_size(cap - total)} left under the cap of {_size(cap)} ({CACHE_ENV}) "
                          f"by stores in use")
        vfs = os.statvfs(root)
        if vfs.f_bavail * vfs.f_frsize - nbytes < FREE_DISK_MARGIN:
            return refuse(f"more than {root} has free (less {_size(FREE_DISK_MARGIN)})")
    except OSError as exc:
        return refuse(f"but {root} cannot hold them ({exc.strerror or exc})")
    return True


# ---------------------------------------------------------------------- image sets


class ImageSet:
    """Images of one split at ``size`` (height, width), decoded as ``view`` says, in a fixed order.

    ``base``: the split indices a store of this set covers (default: the set's own); a set made by
    :meth:`subset` keeps its parent's base, so that the training and validation images of a split
    share one store of the whole split. ``prep``: yield the model's float32 input (N, C, H, W) instead
    of uint8 images (N, H, W, C).

    Sliced and indexed like an array (``x[i : i + 64]``, ``x[ix]``, ``len(x)``, ``x.shape``); iterated in
    batches by :meth:`batches`; ``np.asarray(x)`` reads it whole (small sets only).
    """

    def __init__(self, source: ImageSource, indices: np.ndarray | None, size: tuple[int, int],
                 view: Preprocessing | str, *, prep: Preprocessing | None = None, base: np.ndarray | None = None,
                 store: bool = True) -> None:
        self.source, self.size, self.view, self.prep, self.use_store = source, (int(size[0]), int(size[1])), view, \
            prep, store
        indices = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if base is None:
            self.base, self._rows = indices, np.arange(len(indices), dtype=np.int64)
        else:
            self.base = np.asarray(base, np.int64)
            self._rows = _positions(self.base, indices)
        self.indices = indices
        self.channels = channels(as_preprocessing(view))
        self.stats = {"images": 0, "seconds": 0.0}  # images this set gave, and the time this process spent getting
        # them (decoding, reading a store, or waiting for the decoding workers)

    # -- what it is
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    @property
    def shape(self) -> tuple[int, ...]:
        h, w = self.size
        return (len(self), self.channels, h, w) if self.prep is not None else (len(self), h, w, self.channels)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.prep is not None else np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def fingerprint(self) -> str:
        """Identifies these images (split, order, size, view, preprocessing) without reading them."""
        h = hashlib.sha256()
        h.update(f"{self.source.fingerprint}\0{self.size}\0{view_key(self.view)}\0".encode())
        h.update(self.prep.model_dump_json().encode() if self.prep is not None else b"uint8")
        h.update(np.ascontiguousarray(self.indices).data)
        return h.hexdigest()[:32]

    def subset(self, positions: np.ndarray | Sequence[int]) -> ImageSet:
        """The images at ``positions`` of this set, with its base (and store)."""
        return ImageSet(self.source, self.indices[np.asarray(positions, np.int64)], self.size, self.view,
                        prep=self.prep, base=self.base, store=self.use_store)

    def preprocessed(self, prep: Preprocessing) -> ImageSet:
        """The same images as the model's float32 input (N, C, H, W), through :func:`compressor.data.preprocess`."""
        return ImageSet(self.source, self.indices, self.size, self.view, prep=prep, base=self.base,
                        store=self.use_store)

    # -- by position
    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} images")
            return self.read(np.array([i]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        if isinstance(key, tuple):
            raise TypeError("an ImageSet is indexed by image only (x[i], x[a:b], x[ix])")
        pos = np.asarray(key)
        if pos.dtype == bool:
            pos = np.flatnonzero(pos)
        return self.read(pos.astype(np.int64))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        done = 0
        for batch in self.batches(256):
            out[done : done + len(batch)] = batch
            done += len(batch)
        return out if dtype is None else out.astype(dtype)

    def read(self, positions: np.ndarray) -> np.ndarray:
        """The images at ``positions``, in this process: from a store where one is complete, else decoded
        (where this set is worth a store and has none yet, the store is first written by one pass of
        the decoding workers, and read from)."""
        positions = np.asarray(positions, np.int64)
        plan = self._plan()
        if plan.writer is not None and len(positions) < len(self):
            self._fill(plan)  # random access to a set worth a store: write it whole first, then read it
            plan = self._plan()
        images = self._load(positions, plan)
        if plan.writer is not None:
            _write(plan, plan.rows(self, positions), images)
            plan.writer.commit()
        return self._finish(images)

    # -- in batches
    def batches(self, batch_size: int = 64, *, order: Sequence[np.ndarray] | None = None,
                workers: int | None = None) -> Iterator[np.ndarray]:
        """The images in batches, in a fixed order: consecutive ``batch_size`` positions, or the arrays of
        positions ``order`` gives. Decoded by worker processes (``workers``, default :func:`worker_count`),
        read from a store where one is complete, and written through to one where the set is worth it."""
        chunks = [np.asarray(c, np.int64) for c in order] if order is not None else \
            [np.arange(i, min(i + batch_size, len(self)), dtype=np.int64) for i in range(0, len(self), batch_size)]
        if not chunks:
            return
        plan = self._plan()
        if plan.store is not None:
            workers = 0  # plain reads of a file: cheaper here than handed across processes
        elif workers is None:
            workers = worker_count(sum(len(c) for c in chunks), self.source.paths is None)
        completed = False
        try:
            if workers <= 0:
                for chunk in chunks:
                    images = self._load(chunk, plan)
                    if plan.writer is not None:
                        _write(plan, plan.rows(self, chunk), images)
                    yield self._finish(images)
            else:
                for k, images, wrote in _worker_results(self, chunks, plan, min(workers, len(chunks))):
                    if plan.writer is not None:
                        _written(plan, plan.rows(self, chunks[k]), wrote)
                    yield self._finish(images)
            completed = True
        finally:
            writer = plan.writer
            if writer is not None and writer.open:
                if completed and len(writer.missing()) <= FILL_SHARE * writer.shape[0]:
                    self._fill(plan)
                writer.commit()

    # -- inside
    def _load(self, positions: np.ndarray, plan: _Plan) -> np.ndarray:
        """uint8 images at ``positions``: read from the plan's store, or decoded."""
        started = time.perf_counter()
        images = None
        if plan.store is not None:
            try:
                images = plan.store.read(plan.rows(self, positions))
            except OSError as exc:  # removed by another process's cap, say: decode instead
                if str(plan.store.path) not in _WARNED:
                    _WARNED.add(str(plan.store.path))
                    log.warning("decoded-image store %s cannot be read (%s): decoding instead", plan.store.path.name,
                                exc.strerror or exc)
        if images is None:
            images = self.source.load_images(self.indices[positions], self.size, self.view)
        self.stats["images"] += len(positions)
        self.stats["seconds"] += time.perf_counter() - started
        return images

    def _finish(self, images: np.ndarray) -> np.ndarray:
        if self.prep is None:
            return images
        started = time.perf_counter()
        out = preprocess(images, self.prep)
        self.stats["seconds"] += time.perf_counter() - started
        return out

    def _fill(self, plan: _Plan) -> None:
        """Decode and write the rows the plan's writer still misses (by decoding workers where many),
        then rename the store into place."""
        writer = plan.writer
        assert writer is not None
        missing = writer.missing()
        if len(missing):
            log.info("decoded-image store %s: decoding the %d images it still misses", writer.path.name, len(missing))
            split_indices = missing if plan.whole_split else self.base[missing]
            filler = ImageSet(self.source, split_indices, self.size, self.view, store=False)
            sub = _Plan(writer=writer, row_map=missing)
            chunks = [np.arange(i, min(i + 64, len(filler)), dtype=np.int64) for i in range(0, len(filler), 64)]
            workers = worker_count(len(filler), self.source.paths is None)
            if workers:
                for k, _, wrote in _worker_results(filler, chunks, sub, min(workers, len(chunks))):
                    if not _written(sub, missing[chunks[k]], wrote):
                        return
            else:
                for chunk in chunks:
                    if not _write(sub, missing[chunk], filler._load(chunk, sub)):
                        return
        writer.commit()

    def _plan(self) -> _Plan:
        """Where this set's images come from now: a complete store (of its base or of the whole split),
        a store being written, or decoding alone."""
        if not self.use_store or self.source.paths is None or not self.source.fingerprint:
            return _Plan()
        n_split = len(self.source)
        whole = _store_path(self.source, self.size, self.view, "all")
        base_is_split = len(self.base) == n_split and bool((self.base == np.arange(n_split)).all())
        own = whole if base_is_split else _store_path(self.source, self.size, self.view, _digest(self.base))
        shape = (len(self.base), *self.size, self.channels)
        store = _open_store(own, shape)
        if store is not None:
            return _Plan(store=store, whole_split=base_is_split)
        if not base_is_split:
            store = _open_store(whole, (n_split, *self.size, self.channels))
            if store is not None:
                return _Plan(store=store, whole_split=True)
        writer = _WRITERS.get(str(own))
        if writer is None or not writer.open:
            if (len(self.base) < MIN_STORE_IMAGES or len(self) < STORE_SHARE * len(self.base)
                    or _world_size() > 1):
                return _Plan()
            what = f"the {len(self.base):,} images of {self.source.name} at {self.size[0]}x{self.size[1]}"
            if not _make_room(own, int(np.prod(shape)), what):
                return _Plan()
            try:
                writer = Writer(own, shape)
            except OutputError as exc:
                log.warning("%s", exc.one_line())
                return _Plan()
            _WRITERS[str(own)] = writer
            _IN_USE.add(str(own))
        return _Plan(writer=writer, whole_split=base_is_split)


class _Plan:
    """Where a set's images come from: ``store`` (complete), ``writer`` (decoded, then written), or
    neither (decoded). Store rows are split indices (``whole_split``), positions in the set's base, or
    ``row_map[position]``."""

    def __init__(self, store: Store | None = None, writer: Writer | None = None, whole_split: bool = False,
                 row_map: np.ndarray | None = None) -> None:
        self.store, self.writer, self.whole_split, self.row_map = store, writer, whole_split, row_map

    def rows(self, images: ImageSet, positions: np.ndarray) -> np.ndarray:
        """The rows of the store (or writer) that hold the images at ``positions`` of ``images``."""
        if self.row_map is not None:
            return self.row_map[positions]
        return images.indices[positions] if self.whole_split else images._rows[positions]  # noqa: SLF001


def _write(plan: _Plan, rows: np.ndarray, images: np.ndarray) -> bool:
    """Write decoded images to the plan's store (in this process)."""
    writer = plan.writer
    if writer is None or not writer.open:
        return False
    return _written(plan, rows, writer.write(rows, images))


def _written(plan: _Plan, rows: np.ndarray, wrote: bool) -> bool:
    """Mark ``rows`` written, or drop the store where the write failed."""
    writer = plan.writer
    if writer is None or not writer.open:
        return False
    if wrote:
        writer.mark(rows)
        return True
    log.warning("decoded-image store %s: a write failed (disk full?): not kept", writer.path.name)
    _WARNED.add(str(writer.path))  # not tried again by this process
    writer.discard()
    return False


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _as_is(item: Any) -> Any:
    return item


class _Chunks:
    """The torch Dataset of a pass: item ``k`` is the ``k``-th chunk of positions, decoded (and written
    to the plan's store) in a worker process. Errors come back as values, so that the main process
    raises the original one (a DataError naming the image stays one line)."""

    def __init__(self, images: ImageSet, chunks: list[np.ndarray], plan: _Plan) -> None:
        self.images, self.chunks, self.plan = images, chunks, plan

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[int, Any, bool]:
        try:
            images = self.images._load(self.chunks[k], self.plan)  # noqa: SLF001
            writer = self.plan.writer
            wrote = writer.write(self.plan.rows(self.images, self.chunks[k]), images) \
                if writer is not None and writer.open else True
            return k, images, wrote
        except Exception as exc:  # noqa: BLE001 - raised in the main process
            return k, _Failed(exc), False


def _worker_results(images: ImageSet, chunks: list[np.ndarray], plan: _Plan,
                    workers: int) -> Iterator[tuple[int, np.ndarray, bool]]:
    """(chunk number, uint8 images, written to the plan's store) of every chunk, in order, from
    ``workers`` decoding processes."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Chunks(images, chunks, plan), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=2, persistent_workers=False,
                        multiprocessing_context=_start_method())
    sigchld = _SigchldKept()
    with _quiet_fork():
        it = iter(loader)  # the workers start here
    try:
        while True:
            started = time.perf_counter()  # the time this process waits for the workers
            try:
                k, got, wrote = next(it)
            except StopIteration:
                return
            images.stats["seconds"] += time.perf_counter() - started
            if isinstance(got, _Failed):
                raise got.exc
            images.stats["images"] += len(got)
            yield k, got, wrote
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        sigchld.restore()


class _SigchldKept:
    """The process's SIGCHLD handler as it was before a DataLoader with workers installed torch's
    (which checks the workers' pids at every child's exit, and stays for good once set). Given back
    when the workers are gone: with torch's handler left in place, a later subprocess's exit in the
    same process (a ``mount``, ``benchmark_app``) crashed it with a segmentation fault."""

    def __init__(self) -> None:
        import signal
        import threading

        self.main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD")
        self.before = signal.getsignal(signal.SIGCHLD) if self.main else None

    def restore(self) -> None:
        import signal

        from torch.utils.data._utils import signal_handling

        if not self.main or self.before is None or not getattr(signal_handling, "_SIGCHLD_handler_set", False):
            return
        signal.signal(signal.SIGCHLD, self.before)
        signal_handling._SIGCHLD_handler_set = False  # noqa: SLF001 - the next loader sets it again


def _start_method() -> Any:
    """How decoding workers start: the platform's default (fork on Linux: no import, and no main-guard
    needed in the user's script, as spawn and forkserver would need; spawn on macOS and Windows, for
    which every object a worker gets pickles)."""
    return None


@contextlib.contextmanager
def _quiet_fork() -> Iterator[None]:
    """JAX (imported by the TFLite target's converter) warns at every fork that a multithreaded
    process may deadlock in the child. A decoding worker only reads files, decodes images and writes
    rows: it never calls into JAX, OpenVINO or ONNX Runtime, whose threads it does not have."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def _positions(base: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Where each of ``indices`` sits in ``base``."""
    order = np.argsort(base, kind="stable")
    at = np.searchsorted(base, indices, sorter=order)
    at = np.clip(at, 0, max(len(base) - 1, 0))
    found = order[at] if len(base) else np.zeros(0, np.int64)
    if len(indices) and (not len(base) or not (base[found] == indices).all()):
        raise ValueError("a subset's images must be in its base")
    return found.astype(np.int64)


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, np.int64).data).hexdigest()[:12]


def _store_path(source: ImageSource, size: tuple[int, int], view: Preprocessing | str, selection: str) -> Path:
    vk = hashlib.sha256(view_key(view).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", source.fingerprint)
    return cache_dir() / f"{name}-{size[0]}x{size[1]}-{vk}-{selection}.npy"


# ---------------------------------------------------------------------- helpers for array-or-set code


def in_batches(images: Any, order: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """``images[ix]`` for each ``ix`` of ``order``, in order: an ImageSet's through its decoding workers."""
    if isinstance(images, ImageSet):
        yield from images.batches(order=order)
    else:
        for ix in order:
            yield images[ix]


def consecutive(images: Any, batch_size: int) -> Iterator[np.ndarray]:
    """``images`` (an array or an ImageSet) in consecutive batches."""
    if isinstance(images, ImageSet):
        yield from images.batches(batch_size)
    else:
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]


def timed(batches: Iterator[Any], waited: list[float]) -> Iterator[Any]:
    """``batches``, adding the time spent waiting for each to ``waited[0]``."""
    while True:
        started = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            waited[0] += time.perf_counter() - started
            return
        waited[0] += time.perf_counter() - started
        yield item


IN_MEMORY_BYTES = 64 * 2**20
"""a set read many times is held in memory up to this size (64 explain images at 224: 38 MB)"""


def in_memory(images: ImageSet, max_bytes: int = IN_MEMORY_BYTES) -> np.ndarray | ImageSet:
    """``images`` as an array where they take at most ``max_bytes`` (a fixed small set that is read
    many times), else the set itself, streamed."""
    return np.asarray(images) if images.nbytes <= max_bytes else images


def update_digest(h: Any, images: Any) -> None:
    """Feed ``images`` to hash ``h``: an array's bytes, an ImageSet's fingerprint (no image read)."""
    if isinstance(images, ImageSet):
        h.update(f"imageset:{images.fingerprint()}".encode())
    else:
        h.update(np.ascontiguousarray(images).data)
