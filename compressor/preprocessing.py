"""The geometry that turns a photo into the model's input size, and ``from:`` a library's metadata.

A :class:`Preprocessing` (re-exported by :mod:`compressor.artifact`) says how a decoded photo (already in its colour, RGB
or L; BGR is decoded as RGB, its channels reversed at the end) is brought to the model's input size:
``resize`` (an int: the shorter side, the aspect kept; [height, width]: that exact size), then
``center_crop``, with ``interpolation`` and ``antialias``; with neither, it is resized straight to
the input size. The pixels come from torchvision's own
``transforms.v2.functional`` (:func:`to_input_size`), on the PIL image where ``antialias`` is true
(PIL always antialiases; torchvision does the same with a PIL image), so that the uint8 image is the
one ``weights.transforms()`` or timm's eval transform makes of the same photo.

``from: torchvision:ResNet50_Weights.IMAGENET1K_V2`` (or a model name: its DEFAULT weights) and
``from: timm:MODEL[.TAG]`` read resize, crop, interpolation, mean and std from the library's
metadata (:func:`library_fields`); nothing is downloaded and no model is built.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from PIL import Image

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
COLORS = ("RGB", "BGR", "L")
"""the channel orders a Preprocessing's ``color`` names: BGR is RGB decoded the same way, its channel axis
reversed (models trained on OpenCV-loaded images); mean and std are written in the model's own order"""
LIBRARIES = ("torchvision", "timm")


class GeometryError(ValueError):
    """A photo or a preprocessing that cannot give the model's input size."""


_EXAMPLE = "e.g. from: torchvision:ResNet50_Weights.IMAGENET1K_V2 or from: timm:resnet50.a1_in1k"


class Preprocessing(BaseModel):
    """How a decoded photo becomes the model's input tensor: its colour, the geometry that brings it to
    the input size (resize, center_crop; default: resized straight to the input size), then the
    scale, mean and std of :func:`compressor.data.preprocess`.

    ``from: torchvision:ResNet50_Weights.IMAGENET1K_V2`` or ``from: timm:MODEL`` (input only) fills
    every field the library's metadata gives (see :mod:`compressor.preprocessing`); fields written
    beside it override it (``color: BGR`` beside it puts the library's RGB mean and std in B, G, R order),
    and ``origin`` keeps the name.
    """

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(default=1 / 255, gt=0, description="multiplied into uint8 pixel values first")
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0], description="1 value or 3 (per channel)")
    std: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.0, 1.0, 1.0], description="1 value or 3 (per channel), each > 0")
    layout: str = Field(default="NCHW", pattern="^NCHW$")
    color: Literal["RGB", "BGR", "L"] = Field(
        default="RGB", description="RGB; BGR: the same pixels, channels in B, G, R order (models trained on "
        "OpenCV-loaded images; mean and std in that order too); L: grey, one channel")
    resize: int | list[int] | None = Field(
        default=None, description="an int: the shorter side (the aspect kept; needs center_crop); [height, width]: "
        "that exact size; null: straight to the input size")
    center_crop: int | list[int] | None = Field(
        default=None, description="an int (square) or [height, width], taken from the middle of the resized image; "
        "it must be the model's input size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    antialias: bool = Field(default=True, description="true: resized as a PIL image (which always antialiases), as "
                            "torchvision does a PIL image; false: as a uint8 tensor without antialiasing")
    origin: str | None = Field(default=None, description="the from: these values came from (a record)")

    @model_validator(mode="before")
    @classmethod
    def _from_library(cls, data: Any) -> Any:
        if isinstance(data, dict) and "from" in data:
            spec = data["from"]
            if not isinstance(spec, str):
                raise PydanticCustomError("from", "from: give 'torchvision:WEIGHTS' or 'timm:MODEL', got {got}",
                                          {"got": repr(spec)})
            try:
                fields = library_fields(spec)
            except ValueError as exc:
                raise PydanticCustomError("from", "{msg}", {"msg": str(exc)}) from None
            if data.get("color") == "BGR" and fields["color"] == "RGB":  # the library's RGB mean and std, in B, G, R
                fields = {**fields, "mean": fields["mean"][::-1], "std": fields["std"][::-1]}
            data = {**fields, **{k: v for k, v in data.items() if k != "from"}, "origin": spec.strip()}
        return data

    @field_validator("color", mode="before")
    @classmethod
    def _color(cls, value: Any) -> Any:
        if value not in COLORS:
            raise PydanticCustomError("color", "give RGB, BGR (channels B, G, R, as OpenCV loads images) or L "
                                      "(grey), got {got}", {"got": repr(value)})
        return value

    @field_validator("mean", "std")
    @classmethod
    def _one_or_three(cls, values: list[float]) -> list[float]:
        if len(values) not in (1, 3):
            raise ValueError(f"give 1 value (every channel) or 3 (one per channel), got {len(values)}")
        return values

    @model_validator(mode="after")
    def _geometry(self) -> "Preprocessing":
        problem = geometry_problem(self)
        if problem:
            raise PydanticCustomError("geometry", "{msg}", {"msg": problem})
        return self



# ---------------------------------------------------------------------- colour


def channels(prep: Preprocessing) -> int:
    """How many channels ``prep``'s colour gives: 1 for L, 3 for RGB and BGR."""
    return 1 if prep.color == "L" else 3


def pil_mode(prep: Preprocessing) -> str:
    """The PIL mode a photo is converted to before :func:`to_input_size`: L, or RGB (for BGR too)."""
    return "L" if prep.color == "L" else "RGB"


def channel_order(arr: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """``arr`` (channels last, in :func:`pil_mode`) in ``prep``'s channel order: reversed for BGR."""
    return np.ascontiguousarray(arr[..., ::-1]) if prep.color == "BGR" else arr


# ---------------------------------------------------------------------- geometry


def pair(size: int | list[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int (square) or [height, width]."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _bad_size(name: str, size: Any, int_means: str) -> str | None:
    ok_int = isinstance(size, int) and not isinstance(size, bool) and size > 0
    ok_pair = (isinstance(size, list) and len(size) == 2
               and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size))
    if ok_int or ok_pair:
        return None
    return f"{name}: give a positive int ({int_means}) or [height, width] of positive ints, got {size!r}"


def geometry_problem(prep: Preprocessing) -> str | None:
    """What is wrong with ``prep``'s resize and center_crop on their own (None: nothing)."""
    for name, size, int_means in (("resize", prep.resize, "the shorter side"),
                                  ("center_crop", prep.center_crop, "a square")):
        if size is not None and (problem := _bad_size(name, size, int_means)):
            return problem
    if isinstance(prep.resize, int) and prep.center_crop is None:
        return (f"resize: {prep.resize} sets the shorter side only, so photos of other shapes come out in other "
                f"sizes: give center_crop too (e.g. center_crop: 224), or resize: [height, width]")
    if prep.resize is not None and prep.center_crop is not None:
        ch, cw = pair(prep.center_crop)
        rh, rw = pair(prep.resize)  # an int: the shorter side, so each side is at least that
        if ch > rh or cw > rw:
            resized = f"shorter side {prep.resize}" if isinstance(prep.resize, int) else f"{rh}x{rw}"
            return (f"center_crop: {ch}x{cw} is larger than the resized image ({resized}): the crop is taken from "
                    f"inside it, so give a crop no larger than the resize")
    return None


def output_size(prep: Preprocessing) -> tuple[int, int] | None:
    """The (height, width) that ``prep``'s geometry gives every photo, or None: resized straight to
    whatever input size the model has."""
    if prep.center_crop is not None:
        return pair(prep.center_crop)
    if isinstance(prep.resize, list):
        return pair(prep.resize)
    return None


def describe(prep: Preprocessing) -> str:
    """``resize 232 (shorter side), center_crop 224x224, bilinear`` or ``straight to the input size``."""
    parts = []
    if prep.resize is not None:
        parts.append(f"resize {prep.resize} (shorter side)" if isinstance(prep.resize, int)
                     else "resize {}x{}".format(*prep.resize))
    if prep.center_crop is not None:
        parts.append("center_crop {}x{}".format(*pair(prep.center_crop)))
    if not parts:
        parts.append("straight to the input size")
    return ", ".join(parts) + f", {prep.interpolation}" + ("" if prep.antialias else ", no antialias")


def size_problem(prep: Preprocessing, size: tuple[int, int]) -> str | None:
    """Why ``prep`` cannot feed a model whose input is ``size`` (height, width), or None."""
    out = output_size(prep)
    if out is None or tuple(out) == tuple(size):
        return None
    which = "center_crop" if prep.center_crop is not None else "resize"
    return (f"preprocessing.{which} gives {out[0]}x{out[1]} images, but the model takes {size[0]}x{size[1]}: "
            f"set {which} to {size[0] if size[0] == size[1] else list(size)}, or give the model's input shape")


def is_straight(prep: Preprocessing) -> bool:
    """True where ``prep`` resizes straight to the input size with the default interpolation (the
    geometry every decode had before resize and center_crop existed)."""
    return (prep.resize is None and prep.center_crop is None and prep.interpolation == "bilinear"
            and prep.antialias)


def geometry_key(prep: Preprocessing) -> str:
    """What in ``prep`` decides the resized pixels, for cache keys ('' for the default geometry)."""
    if is_straight(prep):
        return ""
    return (f"resize={prep.resize};crop={prep.center_crop};{prep.interpolation};"
            f"antialias={int(prep.antialias)}").replace(" ", "")


def to_input_size(img: Image.Image, size: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """``img`` (already in :func:`pil_mode`) resized and cropped by torchvision as ``prep`` says, as a
    uint8 (height, width, channels) array of ``size`` in ``prep``'s channel order (:func:`channel_order`).

    Raises GeometryError where the photo is smaller than a center crop taken without a resize
    (torchvision would pad it with black) or where the result is not ``size`` (see :func:`size_problem`).
    """
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    problem = size_problem(prep, size)
    if problem:
        raise GeometryError(problem)
    if (img.size[1], img.size[0]) == tuple(size) and prep.resize is None and prep.center_crop is None:
        return channel_order(np.asarray(img).reshape(size[0], size[1], -1), prep)  # already the input size
    mode = InterpolationMode(prep.interpolation)
    target: list[int]
    if prep.resize is None and prep.center_crop is None:
        target = list(size)
    elif prep.resize is None:
        target = []
    else:
        target = [prep.resize] if isinstance(prep.resize, int) else list(prep.resize)
    if prep.antialias:  # PIL always antialiases: torchvision's kernel for a PIL image, as weights.transforms()
        out: Any = F.resize(img, target, interpolation=mode, antialias=True) if target else img
    else:  # torchvision's kernel for a uint8 tensor, without antialiasing
        out = torch.from_numpy(np.asarray(img).reshape(img.size[1], img.size[0], -1).copy()).permute(2, 0, 1)
        if target:
            out = F.resize(out, target, interpolation=mode, antialias=False)
    if prep.center_crop is not None:
        ch, cw = pair(prep.center_crop)
        h, w = tuple(out.shape[-2:]) if isinstance(out, torch.Tensor) else (out.size[1], out.size[0])
        if ch > h or cw > w:
            raise GeometryError(f"the image is {h}x{w}, smaller than center_crop {ch}x{cw}: give resize too "
                               f"(e.g. resize: {max(ch, cw)}) so that every photo is large enough")
        out = F.center_crop(out, [ch, cw])
    arr = out.permute(1, 2, 0).numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return channel_order(arr.reshape(size[0], size[1], -1), prep)


# ---------------------------------------------------------------------- from: a library's metadata


def library_fields(spec: str) -> dict[str, Any]:
    """The Preprocessing fields ``spec`` (``torchvision:WEIGHTS`` or ``timm:MODEL``) names, from the
    library's metadata without any download. Raises ValueError with one line."""
    library, sep, name = str(spec).strip().partition(":")
    library, name = library.strip(), name.strip()
    if not sep or library not in LIBRARIES:
        known = " or ".join(f"{lib}:..." for lib in LIBRARIES)
        got = f"unknown library {library!r} in {spec!r}" if sep else f"{spec!r} names no library"
        return _raise(f"from: {got}: give {known} ({_EXAMPLE})")
    if not name:
        return _raise(f"from: {spec!r} names no weights or model after '{library}:' ({_EXAMPLE})")
    return _torchvision_fields(name) if library == "torchvision" else _timm_fields(name)


def _raise(message: str) -> Any:
    raise ValueError(message)


def _torchvision_fields(name: str) -> dict[str, Any]:
    import torchvision.models as tvm

    models = tvm.list_models(module=tvm)
    enums = {tvm.get_model_weights(m).__name__: tvm.get_model_weights(m) for m in models}
    if "." not in name and name in models:  # a model name: its default weights
        weights = tvm.get_model_weights(name).DEFAULT
    else:
        enum_name, _, member = name.partition(".")
        enum = enums.get(enum_name)
        if enum is None:
            close = difflib.get_close_matches(enum_name, [*enums, *models], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return _raise(f"from: torchvision has no image-classification weights {enum_name!r}{hint}: give "
                          f"WeightsEnum.NAME such as ResNet50_Weights.IMAGENET1K_V2, or a model name such as "
                          f"resnet50 for its DEFAULT weights")
        members = [w.name for w in enum] + ["DEFAULT"]
        if member not in members:
            return _raise(f"from: torchvision's {enum_name} has no weights {member!r}"
                          f"{'' if member else ' (none given)'}: it has {', '.join(members)}")
        weights = enum[member] if member != "DEFAULT" else enum.DEFAULT
    t = weights.transforms()
    if not (hasattr(t, "resize_size") and hasattr(t, "crop_size")):
        return _raise(f"from: torchvision:{name}'s transform is {type(t).__name__}, not an image-classification "
                      f"resize and crop: give resize and center_crop yourself")
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    if interpolation not in INTERPOLATIONS:
        return _raise(f"from: torchvision:{name} resizes with {interpolation!r}; this tool resizes with "
                      f"{', '.join(INTERPOLATIONS)}: give interpolation beside from:")
    resize, crop = list(t.resize_size), list(t.crop_size)
    return {
        "resize": resize[0] if len(resize) == 1 else resize,
        "center_crop": crop[0] if len(crop) == 1 else crop,
        "interpolation": interpolation,
        "antialias": bool(t.antialias) if t.antialias is not None else True,
        "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std],
        "scale": 1 / 255,
        "color": "RGB",
    }


def _timm_fields(name: str) -> dict[str, Any]:
    try:
        import timm
        from timm.data import DEFAULT_CROP_PCT, resolve_data_config
        from timm.models import get_pretrained_cfg
    except ImportError:
        return _raise(f"from: timm:{name} needs timm, which is not installed here: pip install timm "
                      f"(or compressor[timm]), or give resize, center_crop, interpolation, mean and std yourself")
    arch, _, tag = name.partition(".")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # a known model with an unknown tag
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*") if tag and arch in timm.list_models() else []
        if tags:
            return _raise(f"from: timm's {arch} has no pretrained tag {tag!r}: it has "
                          f"{', '.join(t.partition('.')[2] for t in tags[:12])}{' ...' if len(tags) > 12 else ''}")
        close = difflib.get_close_matches(name, timm.list_pretrained() if tag else timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return _raise(f"from: timm has no model {name!r}{hint}: give a name of timm.list_models() or "
                      f"timm.list_pretrained()")
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    channels, height, width = data["input_size"]
    crop_pct = data.get("crop_pct") or DEFAULT_CROP_PCT
    mode = data.get("crop_mode") or "center"
    interpolation = data.get("interpolation", "bilinear")
    where = f"timm:{name}"
    if interpolation not in INTERPOLATIONS:
        return _raise(f"from: {where} resizes with {interpolation!r}; this tool resizes with "
                      f"{', '.join(INTERPOLATIONS)}: give interpolation beside from:")
    scaled = [math.floor(height / crop_pct), math.floor(width / crop_pct)]  # timm's transforms_imagenet_eval
    if mode == "squash":  # both sides to 1/crop_pct of the input, then the crop
        resize: int | list[int] = scaled
    elif mode == "center" and scaled[0] == scaled[1]:  # the shorter side, as torchvision's Resize(int)
        resize = scaled[0]
    else:
        shape = "a non-square input" if mode == "center" else f"crop_mode {mode!r}"
        return _raise(f"from: {where} has {shape} (timm pads or keeps the ratio differently), which this tool "
                      f"does not reproduce: give resize and center_crop yourself")
    return {
        "resize": resize,
        "center_crop": height if height == width else [height, width],
        "interpolation": interpolation,
        "antialias": True,  # timm resizes the PIL image: PIL always antialiases
        "mean": [float(v) for v in data["mean"]][:channels],
        "std": [float(v) for v in data["std"]][:channels],
        "scale": 1 / 255,
        "color": "RGB" if channels == 3 else "L",
    }
