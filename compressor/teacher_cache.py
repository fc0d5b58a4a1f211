"""Teacher outputs computed once: for a fixed set of augmented views of every training image, the
teacher's logits (and the penultimate features the feature loss uses) are computed once, stored on
disk, and replayed; the student then trains on exactly those views (the idea of "fast knowledge
distillation", stored soft labels). A distillation epoch then costs about a plain student epoch.

The store is keyed by (teacher hash, the training images' bytes and labels, the augmentation, the
view count, whether features are kept). Each view is written whole and then marked done, so a
killed run resumes after the last whole view, and later runs with the same teacher and data reuse
it. Image ``i`` in epoch ``e`` is shown view ``(e + i) % views``: each image cycles its views.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .staging import atomic_write, json_text
from .streaming import consecutive, update_digest
from .training import AUGMENT_PAD, TrainData, crop_flip

log = logging.getLogger(__name__)


def view_offsets(n: int, views: int, seed: int, pad: int = AUGMENT_PAD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip), each (views, n): the crop offsets and mirroring of every stored view."""
    rng = np.random.default_rng([seed, 7919])
    dy = rng.integers(0, 2 * pad + 1, size=(views, n))
    dx = rng.integers(0, 2 * pad + 1, size=(views, n))
    flip = rng.random((views, n)) < 0.5
    return dy, dx, flip


class TeacherViews:
    """The teacher's outputs on ``views`` stored augmented views of every training image."""

    def __init__(self, root: Path, teacher_hash: str, data: TrainData, views: int, seed: int, features: bool) -> None:
        h = hashlib.sha256()
        h.update(json.dumps({"teacher": teacher_hash, "views": views, "seed": seed, "pad": AUGMENT_PAD,
                             "flip": True, "features": features, "n": len(data.x_train),
                             "prep": [data.mean.tolist(), data.std.tolist(), data.scale]}).encode())
        update_digest(h, data.x_train)  # an array's bytes; a streamed set's fingerprint (split, images, size, view)
        h.update(np.ascontiguousarray(data.y_train).data)
        self.key = h.hexdigest()[:32]
        self.dir = Path(root) / self.key
        self.views, self.seed, self.features = views, seed, features
        self.n = len(data.x_train)
        self.dy, self.dx, self.flip = view_offsets(self.n, views, seed)
        self.logits: np.ndarray | None = None
        self.feats: np.ndarray | None = None
        self.computed_views = 0
        self.compute_seconds = 0.0

    def _done(self) -> list[int]:
        try:
            return list(json.loads((self.dir / "done.json").read_text())["views"])
        except (OSError, ValueError, KeyError):
            return []

    def build(self, teacher: Any, feats: Any, data: TrainData, batch: int = 256) -> TeacherViews:
        """Compute the views not yet stored (rank 0 under torchrun; the others wait), then open the store."""
        import torch

        from .training import world

        rank, size = world()
        self.dir.mkdir(parents=True, exist_ok=True)
        done = self._done()
        started = time.perf_counter()
        if rank == 0 and len(done) < self.views:
            logits_path, feats_path = self.dir / "logits.npy", self.dir / "features.npy"
            probe = None
            with torch.inference_mode():
                probe = teacher(data.normalise(torch.from_numpy(data.x_train[:2]))).float()
                dim = feats.value.shape[1] if (self.features and feats is not None) else 0
            shape = (self.views, self.n, probe.shape[1])
            fresh = not logits_path.is_file() or not done
            logits = np.lib.format.open_memmap(logits_path, mode="w+" if fresh else "r+", dtype=np.float32, shape=shape)
            fmap = (np.lib.format.open_memmap(feats_path, mode="w+" if fresh else "r+", dtype=np.float16,
                                              shape=(self.views, self.n, dim)) if dim else None)
            if fresh:
                done = []
            for v in range(self.views):
                if v in done:
                    continue
                log.info("teacher outputs: view %d/%d of %d images", v + 1, self.views, self.n)
                with torch.inference_mode():
                    for uint8, i in zip(consecutive(data.x_train, batch), range(0, self.n, batch)):
                        images = crop_flip(torch.from_numpy(uint8), self.dy[v, i : i + batch],
                                           self.dx[v, i : i + batch], self.flip[v, i : i + batch])
                        logits[v, i : i + batch] = teacher(data.normalise(images)).float().numpy()
                        if fmap is not None:
                            fmap[v, i : i + batch] = feats.value.to(torch.float16).numpy()
                logits.flush()
                if fmap is not None:
                    fmap.flush()
                done.append(v)
                self.computed_views += 1
                atomic_write(self.dir / "done.json", json_text({"views": sorted(done)}, indent=None))
            del logits, fmap
        if size > 1:
            import torch.distributed as dist

            dist.barrier()
        self.compute_seconds = time.perf_counter() - started
        self.logits = np.load(self.dir / "logits.npy", mmap_mode="r")
        if self.features and (self.dir / "features.npy").is_file():
            self.feats = np.load(self.dir / "features.npy", mmap_mode="r")
        return self

    def view_of(self, ix: np.ndarray, epoch: int) -> np.ndarray:
        return (epoch + ix) % self.views

    def images(self, images: Any, ix: np.ndarray, epoch: int) -> Any:
        """The stored views of a uint8 NHWC batch of training images ``ix`` in ``epoch``."""
        v = self.view_of(ix, epoch)
        return crop_flip(images, self.dy[v, ix], self.dx[v, ix], self.flip[v, ix])

    def outputs(self, ix: np.ndarray, epoch: int) -> tuple[Any, Any]:
        """(teacher logits, features or None) for those views, as float32 torch tensors."""
        import torch

        assert self.logits is not None
        v = self.view_of(ix, epoch)
        logits = torch.from_numpy(np.asarray(self.logits[v, ix], dtype=np.float32))
        feats = torch.from_numpy(np.asarray(self.feats[v, ix], dtype=np.float32)) if self.feats is not None else None
        return logits, feats

    def describe(self) -> dict[str, Any]:
        return {"views": self.views, "store": self.key, "computed_views": self.computed_views,
                "reused_views": self.views - self.computed_views, "seconds": round(self.compute_seconds, 1)}
