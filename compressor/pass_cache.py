"""The pass cache: each pass's output keyed by its input's hash, the pass's name and config, the
library versions and the data it saw, so that a run (or compress explain) takes a pass's output
instead of running it again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifact import ModelArtifact
from .devices import Device, or_host
from .environment import library_versions
from .staging import OutputError, json_text, staged_dir, staging_path, write_failure

if TYPE_CHECKING:
    from .data import DataBundle
    from .pass_base import Pass

log = logging.getLogger(__name__)


class PassCache:
    """Pass outputs keyed by (input hash, pass name and config, library versions, data seen).

    Each entry is written to a temporary directory and renamed into place when complete, so a
    run killed mid-way leaves only whole entries and the next run resumes after the last one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.wrote = False  # the last put wrote its entry (False: another process's was there first)

    @staticmethod
    def default_root() -> Path:
        env = os.environ.get("COMPRESSOR_CACHE_DIR")
        return Path(env) if env else Path.home() / ".cache" / "compressor" / "passes"

    def key(self, p: Pass, artifact: ModelArtifact, data: DataBundle | None,
            source: ModelArtifact | None = None, device_profile: Device | None = None) -> str:
        payload: dict[str, Any] = {
            "input": artifact.content_hash(),
            "pass": p.name,
            "config": p.config.model_dump(mode="json"),
            "versions": library_versions(("compressor", *p.used_libraries())),
            "data": data.fingerprint("calibration") if (p.requires_data() and data is not None) else None,
        }
        files = p.fingerprint()
        if files is not None:
            payload["files"] = files
        if p.uses_source() and source is not None:
            payload["source"] = source.content_hash()
        if p.uses_device:  # e.g. reduce_range: auto follows the device
            payload["device"] = or_host(device_profile).name
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, key: str) -> tuple[ModelArtifact, dict[str, Any]] | None:
        entry = self.root / key
        if not (entry / "metrics.json").is_file():
            return None
        try:
            artifact = ModelArtifact.load(entry)
            metrics = json.loads((entry / "metrics.json").read_text())
        except Exception as exc:  # stale or unreadable entry: recompute
            log.warning("ignoring unreadable cache entry %s: %s", entry, exc)
            return None
        return artifact, metrics

    def put(self, key: str, artifact: ModelArtifact, metrics: dict[str, Any]) -> ModelArtifact:
        """Store a pass's output under ``key``, whole (staged, then renamed into place) and once: where
        another process (a cluster worker, a second run) has stored the key meanwhile, its entry is
        kept and returned, and this one is dropped. ``self.wrote`` says which happened."""
        final = self.root / key
        hint = "free space there, or run with --no-cache or another --cache-dir"
        self.wrote = False
        theirs = self.get(key)
        if theirs is not None:
            return theirs[0]
        if final.exists():
            theirs = self.get(key)  # another process may have renamed its whole entry in since the get above
            if theirs is not None:
                return theirs[0]
            # an entry that cannot be read: set aside, then written anew (no process can rename a whole
            # entry over it meanwhile: a rename never replaces a directory that is there)
            stale = staging_path(final, "old")
            try:
                os.replace(final, stale)
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            with staged_dir(final, replace=False, what="pass cache entry") as tmp:
                artifact.save(tmp)
                (tmp / "metrics.json").write_text(json_text(metrics, indent=None))
        except OutputError as exc:
            theirs = self.get(key)
            if theirs is not None:  # another process renamed its entry into place first: one entry, theirs
                return theirs[0]
            raise OutputError(f"{exc.one_line()} ({hint})") from exc
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
            reason = write_failure(exc, self.root)
            if reason is None:
                raise
            raise OutputError(f"cannot write pass cache entry {final}: {reason} ({hint})") from exc
        self.wrote = True
        stored = ModelArtifact.load(final) if artifact.path is not None else artifact
        return stored


class ReadOnlyCache(PassCache):
    """Reads finished entries but writes none (the other processes of a torchrun job)."""

    def put(self, key: str, artifact: Any, metrics: dict[str, Any]) -> Any:
        return artifact
