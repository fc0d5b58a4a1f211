"""Image data: ImageFolder trees, CIFAR-10 by name, and an embedded default (scikit-learn digits).

Each split is a :class:`~compressor.image_source.ImageSource` (file paths or in-memory arrays, listed
lazily) so a 50,000-image training tree costs a directory scan, and only the calibration subset is
decoded. :func:`~compressor.image_source.preprocess` turns uint8 images into the model's float input
with the recipe's or the model's preprocessing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import DataError
from .fingerprints import image_folder_fingerprint
from .image_source import ImageSource, _cache_root, preprocess, view_key  # preprocess: imported from here by passes and targets
from .preprocessing import Preprocessing

if TYPE_CHECKING:
    from .streaming import ImageSet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: str = "train"
    samples: int = Field(default=300, ge=1, le=100_000,
                         description="class-balanced calibration images; a list sweeps the sizes (see sweep)")
    seed: int = 0
    sweep: list[int] | None = Field(default=None, description="set by giving samples a list: every quantize_ptq "
                                    "also calibrates on each size and reports its validation top-1; the engine "
                                    "uses the largest")

    @model_validator(mode="before")
    @classmethod
    def _samples_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("samples"), list):
            sizes = value["samples"]
            if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
                raise ValueError("samples: a list of calibration sizes must hold positive integers")
            value = {**value, "samples": max(sizes), "sweep": sorted(set(sizes))}
        return value


class EvaluationDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: str = "test"
    limit: int | None = Field(default=None, ge=1, description="evaluate on a class-balanced subset of this size")
    seed: int = 0


class ValidationDataConfig(BaseModel):
    """Where accuracy budgets, the calibration sweep and explain take their validation images.

    By default the calibration split, less the images calibration uses. A model trained on that
    split has seen those images in training, and its quantization error on them need not be its
    error on new photos: on the CIFAR-10 MobileNetV2 (trained on the training split), TFLite INT8
    read 0.65 point *better* than FP32 on training images and 0.35 point worse on the test split.
    ``split`` names a split the model was not trained on (a ``val/`` folder); where it is the
    evaluation split itself, ``share`` of it (class-balanced, drawn with ``seed``) validates and is
    left out of evaluation, so that the evaluated figures stay on images the tool never saw."""

    model_config = ConfigDict(extra="forbid")

    split: str | None = Field(default=None, description="the split to validate on; default: the calibration split, "
                              "less its calibration images")
    share: float = Field(default=0.5, gt=0, lt=1, description="where split is the evaluation split: the share of it "
                         "that validates (and is not evaluated)")
    seed: int = 0


class DataConfig(BaseModel):
    """Where images come from. ``source`` is a name (cifar10, digits) or ``folder``."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["folder", "cifar10", "digits"] = "folder"
    root: str | None = Field(default=None, description="directory with train/ and test/ (relative to the recipe)")
    download: bool = Field(default=True, description="cifar10: download when not found locally and the network allows")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationDataConfig = Field(default_factory=EvaluationDataConfig)
    validation: ValidationDataConfig = Field(default_factory=ValidationDataConfig)


# ---------------------------------------------------------------------- sources


def scan_image_folder(root: Path, split_name: str) -> ImageSource:
    """An ImageFolder split: ``root/<class>/<image>``, classes in sorted order (torchvision's)."""
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subdirectories (expected ImageFolder layout root/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    listing: list[tuple[str, str, int]] = []
    for label, cls in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(root / cls) if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES),
            key=lambda e: e.name,
        )
        for e in entries:
            paths.append(root / cls / e.name)
            labels.append(label)
            listing.append((cls, e.name, e.stat().st_size))
    if not paths:
        raise DataError(f"{root} has class directories but no images")
    return ImageSource(name=split_name, classes=classes, labels=np.asarray(labels), paths=paths,
                       fingerprint=image_folder_fingerprint(listing, paths[::997]))  # names, sizes, every 997th image


def _split_dirs(root: Path) -> dict[str, Path]:
    return {e.name: Path(e.path) for e in os.scandir(root) if e.is_dir() and e.name in ("train", "test", "val")}


def digits_source(split: str) -> ImageSource:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images), split 75/25, stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.25, random_state=0, stratify=digits.target
    )
    idx = {"train": idx_train, "test": idx_test}.get(split)
    if idx is None:
        raise DataError(f"the digits data set has splits train and test, not {split!r}")
    idx = np.sort(idx)
    return ImageSource(
        name=f"digits/{split}",
        classes=[str(c) for c in digits.target_names],
        labels=digits.target[idx].astype(np.int64),
        arrays=images[idx],
        fingerprint=f"sklearn-digits-{split}-{len(idx)}",
    )


def _cifar10_source(root: Path | None, split: str, download: bool) -> ImageSource:
    candidates = [root] if root else _default_roots("cifar10")
    for cand in candidates:
        if cand is None:
            continue
        if (cand / split).is_dir():
            return scan_image_folder(cand / split, f"cifar10/{split}")
        if (cand / "cifar-10-batches-py").is_dir():
            return _cifar10_torchvision(cand, split, download=False)
    target = root or _cache_root() / "cifar10"
    if download:
        try:
            return _cifar10_torchvision(target, split, download=True)
        except Exception as exc:  # no network, mostly
            raise DataError(
                f"CIFAR-10 not found locally (looked in {', '.join(str(c) for c in candidates if c)}) and the "
                f"download failed ({type(exc).__name__}): give data.root or --data DIR"
            ) from exc
    raise DataError(f"CIFAR-10 not found in {', '.join(str(c) for c in candidates if c)}: give data.root or --data DIR")


def _cifar10_torchvision(root: Path, split: str, download: bool) -> ImageSource:
    from torchvision.datasets import CIFAR10

    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 has splits train and test, not {split!r}")
    ds = CIFAR10(str(root), train=split == "train", download=download)
    return ImageSource(
        name=f"cifar10/{split}",
        classes=list(ds.classes),
        labels=np.asarray(ds.targets, dtype=np.int64),
        arrays=np.asarray(ds.data),
        fingerprint=f"cifar10-binary-{split}-{len(ds.targets)}",
    )


_extra_roots: list[Path] = []


def add_search_root(path: Path) -> None:
    """Look for named data sets (``<dir>/<name>``) in ``path`` too, e.g. ``datasets/`` beside a model."""
    if path not in _extra_roots:
        _extra_roots.append(path)


def _default_roots(name: str) -> list[Path]:
    roots = [_cache_root(), Path.cwd() / "data", Path.cwd() / "datasets", *_extra_roots]
    return [r / name for r in roots]


@dataclass
class DataBundle:
    """The calibration and evaluation splits a run uses, plus the preprocessing that feeds them."""

    config: DataConfig
    calibration_source: ImageSource
    evaluation_source: ImageSource
    validation_source: ImageSource | None = None  # a split of its own (data.validation.split)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def validation_mode(self) -> str:
        """``calibration`` (the calibration split less its calibration images), ``evaluation`` (a share
        of the evaluation split, left out of evaluation) or ``own`` (a split of its own)."""
        split = self.config.validation.split
        if split is None or split == self.config.calibration.split:
            return "calibration"
        return "evaluation" if split == self.config.evaluation.split else "own"

    def validation_where(self, calibrated: int | None = None) -> str:
        """Where validation images come from, in words (reports)."""
        mode, v = self.validation_mode, self.config.validation
        if mode == "calibration":
            return (f"split {self.config.calibration.split!r}, images not used for calibration (not its "
                    f"{self.calibration_count(calibrated)} calibration images; never the evaluated images)")
        if mode == "evaluation":
            return (f"{v.share:.0%} of split {v.split!r} (seed {v.seed}), left out of evaluation: the evaluated "
                    f"figures are on the other images")
        return f"split {v.split!r}"

    def _validation_part(self) -> np.ndarray:
        """data.validation.share of the evaluation split, class-balanced (mode ``evaluation``)."""
        v, src = self.config.validation, self.evaluation_source
        return np.sort(src.balanced_indices(max(1, int(round(v.share * len(src)))), v.seed))

    @property
    def classes(self) -> list[str]:
        return self.evaluation_source.classes

    def calibration_count(self, count: int | None = None) -> int:
        """How many images a request for ``count`` (default: data.calibration.samples) gets: at most
        the calibration split's size (:meth:`ImageSource.balanced_indices` takes every image then)."""
        return min(count or self.config.calibration.samples, len(self.calibration_source))

    def calibration_images(self, size: tuple[int, int], view: Preprocessing | str, count: int | None = None) -> np.ndarray:
        cfg = self.config.calibration
        n = count or cfg.samples
        key = ("cal", size, view_key(view), n)
        if key not in self._cache:
            if n > len(self.calibration_source) and n != cfg.samples:  # cfg.samples: warned by open_data
                log.warning("%d calibration images asked for, but split %r has only %d: calibrating on %d",
                            n, cfg.split, len(self.calibration_source), len(self.calibration_source))
            idx = self.calibration_source.balanced_indices(n, cfg.seed)
            self._cache[key] = self.calibration_source.load_images(idx, size, view)
        return self._cache[key]

    def calibration_per_class(self, count: int | None = None) -> dict[str, int]:
        """How many calibration images of each class a request for ``count`` gets."""
        src = self.calibration_source
        labels = src.labels[src.balanced_indices(self.calibration_count(count), self.config.calibration.seed)]
        return {src.classes[c]: int((labels == c).sum()) for c in range(len(src.classes))}

    def _validation_pool(self, calibrated: int | None) -> tuple[ImageSource, np.ndarray]:
        mode = self.validation_mode
        if mode == "evaluation":
            return self.evaluation_source, self._validation_part()
        if mode == "own":
            assert self.validation_source is not None
            return self.validation_source, np.arange(len(self.validation_source))
        cfg = self.config.calibration
        src = self.calibration_source
        used = src.balanced_indices(self.calibration_count(calibrated), cfg.seed)
        return src, np.setdiff1d(np.arange(len(src)), used)

    def validation_indices(self, count: int, *, calibrated: int | None = None) -> np.ndarray:
        """``count`` class-balanced indices of validation images (:attr:`validation_mode`; by default
        the training (calibration) split less the images calibration with ``calibrated`` images,
        default data.calibration.samples, uses), drawn with seed data.calibration.seed + 1 (or
        data.validation.seed + 1). Never an evaluated image: for explaining and for accuracy budgets."""
        src, rest = self._validation_pool(calibrated)
        if len(rest) == 0:
            raise DataError(f"every image of split {self.config.calibration.split!r} is a calibration image: none is "
                            f"left to validate on (lower data.calibration.samples, or set data.validation.split)")
        seed = (self.config.validation.seed if self.validation_mode != "calibration" else
                self.config.calibration.seed) + 1
        pool = ImageSource(name=src.name, classes=src.classes, labels=src.labels[rest])
        return rest[pool.balanced_indices(count, seed)]

    def validation_available(self, *, calibrated: int | None = None) -> int:
        """How many validation images there are (:meth:`validation_indices`)."""
        return len(self._validation_pool(calibrated)[1])

    def validation_images(self, size: tuple[int, int], view: Preprocessing | str, count: int, *,
                          calibrated: int | None = None) -> ImageSet:
        """The images of :meth:`validation_indices`, streaming (:class:`compressor.streaming.ImageSet`:
        read in batches or by position, never held whole; ``.labels``)."""
        from .streaming import ImageSet

        src = self._validation_pool(calibrated)[0]
        return ImageSet(src, self.validation_indices(count, calibrated=calibrated), size, view)

    def validation_set(self, size: tuple[int, int], view: Preprocessing | str, count: int, *,
                       calibrated: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels of :meth:`validation_indices`, in memory: for small sets (tests); a
        run streams them (:meth:`validation_images`)."""
        key = ("val", size, view_key(view), count, calibrated)
        if key not in self._cache:
            images = self.validation_images(size, view, count, calibrated=calibrated)
            self._cache[key] = (np.asarray(images), images.labels)
        return self._cache[key]

    def split_images(self, which: str, size: tuple[int, int], view: Preprocessing | str) -> ImageSet:
        """Every image of the training (calibration) or evaluation split, streaming: decoded by worker
        processes, and kept decoded on disk (one store of the whole split, keyed by its fingerprint,
        size and view) so that later passes and runs skip decoding (:mod:`compressor.streaming`)."""
        from .streaming import ImageSet

        return ImageSet(self.calibration_source if which == "train" else self.evaluation_source, None, size, view)

    def evaluation_indices(self) -> np.ndarray:
        """Indices into the evaluation split of the images evaluated, in evaluation order."""
        cfg = self.config.evaluation
        src = self.evaluation_source
        if self.validation_mode == "evaluation":  # the validation share is never evaluated
            rest = np.setdiff1d(np.arange(len(src)), self._validation_part())
            if cfg.limit is None:
                return rest
            pool = ImageSource(name=src.name, classes=src.classes, labels=src.labels[rest])
            return rest[pool.balanced_indices(cfg.limit, cfg.seed)]
        return np.arange(len(src)) if cfg.limit is None else src.balanced_indices(cfg.limit, cfg.seed)

    def evaluation_images(self, size: tuple[int, int], view: Preprocessing | str) -> ImageSet:
        """The evaluated images in evaluation order, streaming (:class:`compressor.streaming.ImageSet`:
        read in batches by decoding workers, or from its store on disk; ``.labels``)."""
        from .streaming import ImageSet

        return ImageSet(self.evaluation_source, self.evaluation_indices(), size, view)

    def evaluation_set(self, size: tuple[int, int], view: Preprocessing | str) -> tuple[np.ndarray, np.ndarray]:
        """The evaluated uint8 images and labels, in memory: for small sets (tests); a run streams them
        (:meth:`evaluation_images`)."""
        key = ("eval", size, view_key(view))
        if key not in self._cache:
            images = self.evaluation_images(size, view)
            self._cache[key] = (np.asarray(images), images.labels)
        return self._cache[key]

    def evaluation_labels(self) -> np.ndarray:
        """The labels of the evaluated images, in evaluation order (no image is decoded)."""
        return self.evaluation_source.labels[self.evaluation_indices()]

    def evaluation_ids(self) -> list[str]:
        """An id per evaluated image, in evaluation order: ``class/file`` for an image folder (relative,
        so the same tree elsewhere gives the same ids), else ``<split name>#<index in the split>``."""
        src = self.evaluation_source
        idx = self.evaluation_indices()
        if src.paths is not None:
            return [f"{src.paths[int(i)].parent.name}/{src.paths[int(i)].name}" for i in idx]
        return [f"{src.name}#{int(i)}" for i in idx]

    def evaluation_fingerprint(self) -> str:
        """A hash of the ordered (image id, label) list evaluated and the class names: two runs with
        the same value measured on the same images in the same order."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode() + b"\0")
        for image_id, label in zip(self.evaluation_ids(), self.evaluation_labels().tolist()):
            h.update(f"{image_id}\t{label}\n".encode())
        return h.hexdigest()[:32]

    def fingerprint(self, kind: str) -> str:
        """Identifies the images a pass or an evaluation saw (for cache keys and reports)."""
        if kind == "calibration":
            c = self.config.calibration
            # the count used, not the one asked for: 5000 and 100000 of a 1347-image split are the same images
            sweep = f":sweep={','.join(map(str, c.sweep))}" if c.sweep else ""
            return f"{self.calibration_source.fingerprint}:{self.calibration_count()}:{c.seed}{sweep}"
        e = self.config.evaluation
        return f"{self.evaluation_source.fingerprint}:{e.limit}:{e.seed}"

    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of the data's images as stored (the size a model without a known input
        shape is given), or None when they differ in size (checked on up to 32 images per split)."""
        sizes = {size for src in (self.calibration_source, self.evaluation_source) for size in src.image_sizes(32)}
        if len(sizes) != 1:
            if sizes:
                log.warning("the data's images differ in size (%s): they give no input shape",
                            ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3]))
            return None
        return sizes.pop()


def open_data(config: DataConfig, *, base_dir: Path | None = None) -> DataBundle:
    """Resolve the config's source into calibration and evaluation splits."""
    root = Path(config.root) if config.root else None
    if root is not None and not root.is_absolute() and base_dir is not None:
        root = base_dir / root
    cal_split, eval_split = config.calibration.split, config.evaluation.split

    if config.source == "digits":
        cal, ev = digits_source(cal_split), digits_source(eval_split)
    elif config.source == "cifar10":
        cal = _cifar10_source(root, cal_split, config.download)
        ev = _cifar10_source(root, eval_split, config.download)
    else:
        if root is None:
            raise DataError("data.source 'folder' needs data.root (a directory with train/ and test/)")
        if not root.is_dir():
            raise DataError(f"data directory not found: {root}")
        splits = _split_dirs(root)
        for split in (cal_split, eval_split):
            if split not in splits:
                raise DataError(f"{root} has no {split}/ directory (found: {', '.join(sorted(splits)) or 'none'})")
        cal = scan_image_folder(splits[cal_split], cal_split)
        ev = scan_image_folder(splits[eval_split], eval_split)
    if cal.classes != ev.classes:
        raise DataError(f"the {cal_split} and {eval_split} splits have different classes")
    val_split = config.validation.split
    val = None
    if val_split is not None and val_split not in (cal_split, eval_split):
        if config.source == "digits":
            val = digits_source(val_split)
        elif config.source == "cifar10":
            val = _cifar10_source(root, val_split, config.download)
        else:
            if val_split not in splits:
                raise DataError(f"data.validation.split: {root} has no {val_split}/ directory (found: "
                                f"{', '.join(sorted(splits))})")
            val = scan_image_folder(splits[val_split], val_split)
        if val.classes != ev.classes:
            raise DataError(f"the {val_split} and {eval_split} splits have different classes")
    log.info("data: %d calibration candidates, %d evaluation images, %d classes", len(cal), len(ev), len(ev.classes))
    if len(cal) < config.calibration.samples:
        log.warning("data.calibration.samples asks for %d images, but split %r has only %d: calibrating on %d",
                    config.calibration.samples, cal_split, len(cal), len(cal))
    return DataBundle(config=config, calibration_source=cal, evaluation_source=ev, validation_source=val)
