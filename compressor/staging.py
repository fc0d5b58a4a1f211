"""Writing outputs whole or not at all: every writer (run output, pass cache entries, engines,
baselines, report files) builds into a staging place beside its destination and swaps it in with
one rename when complete.

- :func:`staged_dir` / :func:`swap_into_place`: a directory built in ``.NAME.partial-PID`` and
  renamed to ``NAME``; an existing ``NAME`` is replaced only when the caller says so.
- :func:`atomic_write`: a file written beside its destination and renamed over it.
- :func:`sweep_stale`: staging left by a process that is gone (``kill -9``) is removed by the next
  writer of the same destination.
- :func:`run_tempdir`: one temporary directory per run for everything a run and the libraries it
  calls put in TMPDIR, removed on every exit the process survives, swept by the next run when not.
- :func:`check_writable`: the preflight's probe, before hours of training start.

Outputs get the user's umask (``mkstemp``/``mkdtemp`` would make them 0600/0700).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CompressorError


class OutputError(CompressorError):
    """An output (directory, file, cache entry) cannot be written where it was asked for."""


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``No space left on device``."""
    return exc.strerror or type(exc).__name__


_LIBRARY_WRITE_FAILURES = ("unexpected pos", "iostream error", "failed writing", "write_end_of_file",
                           "pytorchstreamwriter", "file write failed", "no space left")


def write_failure(exc: BaseException, where: Path | None = None) -> str | None:
    """Why writing failed, in a few words, when ``exc`` (or an exception it chains) is an OSError
    or a library's report of a failed write (torch.save on a full disk raises ``RuntimeError:
    [enforce fail at inline_container.cc:672] unexpected pos ...``); None for any other error.
    With ``where``, a library's failure says how much space is left on its file system."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            return describe_os_error(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(exc).split())
    if not isinstance(exc, RuntimeError) or not any(s in text.lower() for s in _LIBRARY_WRITE_FAILURES):
        return None
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)[:160]
    free = ""
    if where is not None:
        with contextlib.suppress(OSError):
            st = os.statvfs(nearest_existing(where))
            free = f"; {st.f_bavail * st.f_frsize // 1024} KiB free there: is the disk full?"
    return f"the write failed ({text}{free})"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<host>[^-]+)-(?P<pid>\d+)$")


def staging_path(dest: Path, kind: str = "partial") -> Path:
    """``dir/.NAME.partial-HOST-PID`` beside ``dest``: unique per live process, recognisable when stale."""
    return dest.parent / f".{dest.name}.{kind}-{_HOST}-{os.getpid()}"


def sweep_stale(dest: Path) -> list[Path]:
    """Remove staging directories and files beside ``dest`` whose process (on this host) is gone."""
    removed: list[Path] = []
    parent = dest.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _STAGING.match(entry.name)
        if not m or m["name"] != dest.name or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def swap_into_place(staging: Path, dest: Path, *, replace: bool) -> None:
    """Rename the finished ``staging`` directory to ``dest``.

    A missing or empty ``dest`` is taken over. An existing non-empty one is replaced only with
    ``replace=True`` (the caller has checked it is its own kind of output and the user asked):
    it is renamed aside, the new one renamed in, and only then the old one removed.
    """
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise OutputError(f"{dest} exists and is not a directory: not replacing it")
    if _is_empty_dir(dest):
        dest.rmdir()
    if not dest.exists():
        os.replace(staging, dest)
        return
    if not replace:
        raise OutputError(f"{dest} already exists: not replacing it")
    trash = staging_path(dest, "old")
    os.replace(dest, trash)
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(trash, dest)  # put the old one back
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(dest: Path, *, replace: bool = False, what: str = "output") -> Iterator[Path]:
    """Build a directory in a staging place; on success swap it into ``dest``, on failure remove it.

    >>> with staged_dir(Path("out/engines/openvino-int8")) as tmp:
    ...     (tmp / "model.xml").write_text(xml)
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(dest)
        staging = staging_path(dest)
        if staging.exists():
            _remove(staging)
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write {what} {dest}: {describe_os_error(exc)}") from exc
    try:
        yield staging  # the body's own errors pass through unchanged
    except BaseException:
        _remove(staging)
        raise
    try:
        swap_into_place(staging, dest, replace=replace)
    except BaseException as exc:
        _remove(staging)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {what} {dest}: {describe_os_error(exc)}") from exc
        raise


@contextlib.contextmanager
def staged_file(path: Path, *, what: str = "file") -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error, removed when it does not."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {describe_os_error(exc)}") from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {what} {path}: {describe_os_error(exc)}") from exc
        raise


def atomic_write(path: Path, data: str | bytes, *, what: str = "file") -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, renamed over it)."""
    with staged_file(path, what=what) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)


def json_text(value: object, *, indent: int | None = 1) -> str:
    """``value`` as strict JSON text (a newline at the end): NaN and infinity, which a measurement
    may legitimately produce (an SQNR of identical outputs, a ratio over zero), become null, since
    ``NaN`` / ``Infinity`` are not JSON and strict parsers (jq, browsers, other languages) reject the
    file; numpy numbers become plain numbers; anything else JSON lacks is written as its str()."""
    return json.dumps(_json_safe(value), indent=indent, allow_nan=False, default=str) + "\n"


def _json_safe(value: object) -> object:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool | numbers.Integral):
        return value if isinstance(value, bool | int) else int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Refuse now, not after training, when ``path`` (a directory or file to be created or replaced)
    cannot be written: probe its nearest existing ancestor by creating and removing a file there."""
    path = Path(path)
    base = nearest_existing(path)
    if path.exists() and path.is_dir():
        base = path
    elif base == Path(os.path.abspath(path)):  # an existing file: its directory is what is written
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"cannot write {what} {path}: {base} is not a directory")
    probe = base / f".compressor-probe-{_HOST}-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        reason = describe_os_error(exc)
        if exc.errno == errno.EROFS:
            reason = "read-only file system"
        raise OutputError(f"cannot write {what} {path}: {base} is not writable ({reason})") from exc


_RUN_PREFIX = "compressor-run-"
_RUN_DIR = re.compile(rf"^{_RUN_PREFIX}(?P<host>[^-]+)-(?P<pid>\d+)-")


def sweep_stale_run_dirs(root: Path | None = None) -> list[Path]:
    """Remove per-run temporary directories of processes (on this host) that are gone."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = _RUN_DIR.match(entry.name)
            if m and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid != os.getuid():
                        continue
                _remove(entry)
                removed.append(entry)
    return removed


def run_scratch() -> tempfile.TemporaryDirectory:
    """A run's scratch directory, named so that :func:`sweep_stale_run_dirs` knows it (the Python
    API's Pipeline.run keeps it as long as its result, whose artifacts may live there)."""
    sweep_stale_run_dirs()
    return tempfile.TemporaryDirectory(prefix=f"{_RUN_PREFIX}{_HOST}-{os.getpid()}-")


@contextlib.contextmanager
def run_tempdir() -> Iterator[Path]:
    """One temporary directory for everything this run (and the libraries it calls: ONNX Runtime's
    quantizer, NNCF, exporters) puts in TMPDIR. It is removed when the block ends, on success, on
    an error and on Ctrl-C/SIGTERM; after ``kill -9`` the next run removes it."""
    sweep_stale_run_dirs()
    if tempfile.tempdir is not None and _RUN_DIR.match(Path(tempfile.tempdir).name):
        yield Path(tempfile.tempdir)  # nested (e.g. the demo's job inside the demo): one is enough
        return
    root = Path(tempfile.gettempdir())
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{_HOST}-{os.getpid()}-"))
    except OSError as exc:
        raise OutputError(f"cannot create a temporary directory in {root}: "
                          f"{describe_os_error(exc)} (set TMPDIR to a writable place)") from exc
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)
        tidy_tmpdir(root)


ORT_SESSION_FILE = ".ses"
"""ONNX Runtime's telemetry session file: written into TMPDIR once, when onnxruntime is first imported
(an ONNX model's intake imports it before the run's directory exists), never touched again"""


def tidy_tmpdir(root: Path) -> list[Path]:
    """Remove what the libraries of this process left in ``root`` (the TMPDIR the run found) outside the
    run's own directory: ONNX Runtime's ``.ses`` where this process made it (onnxruntime imported, the file
    no older than the process), and the empty log directories torchrun makes for its workers
    (``torchelastic_*/RUN/attempt_N/RANK``: each worker removes its own and whatever is left empty above
    it, so the last one out removes the tree; a file in it, such as logs asked for, keeps it)."""
    removed: list[Path] = []
    ses = root / ORT_SESSION_FILE
    started = _process_started()
    if "onnxruntime" in sys.modules and started is not None:
        with contextlib.suppress(OSError):
            if ses.is_file() and ses.stat().st_mtime >= started - 1:  # btime has whole seconds
                ses.unlink()
                removed.append(ses)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        rank_dir = Path(error_file).parent
        chain = [rank_dir, *list(rank_dir.parents)[:3]]  # RANK, attempt_N, RUN, torchelastic_*
        base = chain[-1]
        if len(chain) == 4 and base.name.startswith("torchelastic_") and _same_dir(base.parent, root):
            for d in chain:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    continue  # another worker removed it: go on up
                except OSError:
                    break  # not empty: another worker is still running, or it holds files
                removed.append(d)
    return removed


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _process_started() -> float | None:
    """When this process started (seconds since the epoch), from /proc; None where there is none."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
