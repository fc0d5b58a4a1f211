"""Preprocessing as users write it (issue 23, part 1): resize, center_crop, interpolation, antialias,
``from:`` torchvision's weight enums or timm's pretrained configs, and ``color: BGR`` (channel order).

The parity tests decode non-square photos of several sizes and modes (JPEG, grey, RGBA) through the
tool's own path (ImageSource.load_images, then data.preprocess) and compare the float tensor with
what the library's own transform makes of the same file opened as torchvision's ImageFolder opens it
(PIL, converted to RGB): within 1e-5."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.artifact import Preprocessing
from compressor.data import ImageSource, preprocess, scan_image_folder, view_key
from compressor.errors import DataError, ModelLoadError
from compressor.image_source import _resize_stack
from compressor.intake import load_model
from compressor.preprocessing import library_fields, to_input_size

from .conftest import cli, one_error_line, tiny_cnn, write_recipe

# (width, height, PIL mode): landscape, portrait, narrow, small; grey and RGBA too
PHOTOS = [(200, 640, "RGB"), (375, 500, "RGB"), (640, 480, "RGB"), (333, 222, "RGB"), (500, 375, "L"),
          (480, 360, "RGBA"), (257, 259, "RGB")]
TOLERANCE = 1e-5


def _photo(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A smooth picture with edges and noise, so that every interpolation differs from the others."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(x / (7 + 5 * c) + c) * np.cos(y / (11 + 3 * c)) * 90 + 128 for c in range(4)]
    arr = np.stack(channels, -1) + rng.normal(0, 20, (height, width, 4))
    arr[(x // 37 + y // 29) % 2 == 0] //= 2  # hard edges
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr[..., :3] if mode == "RGB" else arr, mode)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> ImageSource:
    root = tmp_path_factory.mktemp("photos") / "test"
    (root / "any").mkdir(parents=True)
    for i, (w, h, mode) in enumerate(PHOTOS):
        img = _photo(w, h, mode, i)
        img.save(root / "any" / (f"{i}_{w}x{h}.png" if mode == "RGBA" else f"{i}_{w}x{h}.jpg"), quality=90)
    return scan_image_folder(root, "test")


def _ours(src: ImageSource, prep: Preprocessing, size: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(preprocess(src.load_images(np.arange(len(src)), size, prep), prep))


def _theirs(src: ImageSource, transform) -> torch.Tensor:
    """The library's transform on each file as ImageFolder's default loader opens it."""
    out = []
    for path in src.paths:
        with Image.open(path) as img:
            out.append(transform(img.convert("RGB")))
    return torch.stack(out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("weights, size", [
    ("ResNet50_Weights.IMAGENET1K_V2", 224),  # resize 232, crop 224, bilinear
    ("ResNet50_Weights.IMAGENET1K_V1", 224),  # resize 256, crop 224, bilinear
    ("EfficientNet_B0_Weights.IMAGENET1K_V1", 224),  # resize 256, crop 224, bicubic
    ("EfficientNet_B3_Weights.IMAGENET1K_V1", 300),  # resize 320, crop 300, bicubic
    ("ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1", 384),  # resize 384, crop 384, bicubic
    ("MobileNet_V3_Large_Weights.IMAGENET1K_V2", 224),  # resize 232, crop 224, bilinear
])
def test_from_torchvision_weights_equals_weights_transforms(photos, weights, size):
    from torchvision.models import get_weight

    prep = Preprocessing(**{"from": f"torchvision:{weights}"})
    assert prep.origin == f"torchvision:{weights}"
    diff = _max_diff(_ours(photos, prep, (size, size)), _theirs(photos, get_weight(weights).transforms()))
    print(f"torchvision:{weights} max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


def _v2(resize, crop, interpolation, antialias=True, tensor_first=False,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The transform as a user writes it with torchvision.transforms.v2."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    steps = [v2.Resize(resize, interpolation=InterpolationMode(interpolation), antialias=antialias)]
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose([v2.ToImage(), *steps, *tail] if tensor_first else [*steps, v2.ToImage(), *tail])


@pytest.mark.parametrize("fields, size, reference", [
    ({"resize": 256, "center_crop": 224, "interpolation": "bicubic"}, (224, 224), _v2(256, 224, "bicubic")),
    ({"resize": 240, "center_crop": [200, 220], "interpolation": "nearest"}, (200, 220),
     _v2(240, [200, 220], "nearest")),
    ({"resize": [256, 320], "center_crop": 224}, (224, 224), _v2([256, 320], 224, "bilinear")),
    ({"resize": [160, 120]}, (160, 120), _v2([160, 120], None, "bilinear")),
    # antialias false: resized as a uint8 tensor, as ToImage() before Resize(antialias=False)
    ({"resize": 256, "center_crop": 224, "antialias": False}, (224, 224),
     _v2(256, 224, "bilinear", antialias=False, tensor_first=True)),
    ({"resize": 256, "center_crop": 224, "interpolation": "bicubic", "antialias": False}, (224, 224),
     _v2(256, 224, "bicubic", antialias=False, tensor_first=True)),
])
def test_written_geometry_equals_torchvision_v2(photos, fields, size, reference):
    prep = Preprocessing(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], **fields)
    diff = _max_diff(_ours(photos, prep, size), _theirs(photos, reference))
    print(f"{fields} max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("model, size", [
    ("resnet50.a1_in1k", 224),  # center, crop_pct 0.95 -> resize 235, bicubic
    ("resnet50.tv_in1k", 224),  # crop_pct 0.875 -> 256, bilinear
    ("convnext_tiny.fb_in22k_ft_in1k_384", 384),  # squash: resize [384, 384], crop 384
    ("vit_base_patch16_clip_224.openai_ft_in12k_in1k", 224),  # CLIP mean and std
])
def test_from_timm_equals_timms_eval_transform(photos, model, size):
    pytest.importorskip("timm", reason="timm is not installed (pip install 'compressor[timm]')")
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    prep = Preprocessing(**{"from": f"timm:{model}"})
    transform = create_transform(**resolve_data_config(pretrained_cfg=get_pretrained_cfg(model).to_dict()))
    diff = _max_diff(_ours(photos, prep, (size, size)), _theirs(photos, transform))
    print(f"timm:{model} max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


def test_fields_beside_from_override_it(photos):
    from torchvision.models import ResNet50_Weights

    prep = Preprocessing(**{"from": "torchvision:ResNet50_Weights.IMAGENET1K_V2", "interpolation": "bicubic",
                            "resize": 256})
    assert (prep.resize, prep.center_crop, prep.interpolation) == (256, 224, "bicubic")
    assert prep.mean == list(ResNet50_Weights.IMAGENET1K_V2.transforms().mean)
    diff = _max_diff(_ours(photos, prep, (224, 224)), _theirs(photos, _v2(256, 224, "bicubic")))
    assert diff <= TOLERANCE
    # a model name means its DEFAULT weights; what a run saves reloads without asking the library again
    assert Preprocessing(**{"from": "torchvision:resnet50"}).resize == 232
    again = Preprocessing(**prep.model_dump())
    assert again == prep and again.origin == "torchvision:ResNet50_Weights.IMAGENET1K_V2"


def test_normalisation_matches_torchvision_todtype_normalize():
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 17, 23, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = preprocess(images, Preprocessing(mean=mean, std=std))
    theirs = torch.stack([v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(
        img) for img in images])
    assert float(np.abs(ours - theirs.numpy()).max()) <= TOLERANCE


def test_default_geometry_is_todays_straight_resize(photos):
    """No resize and no crop: resized straight to the size with PIL bilinear, byte for byte as before,
    and a colour name and the default Preprocessing share their cache key."""
    ours = photos.load_images(np.arange(len(photos)), (40, 56), "RGB")
    for row, path in enumerate(photos.paths):
        with Image.open(path) as img:
            before = np.asarray(img.convert("RGB").resize((56, 40), Image.BILINEAR))
        assert np.array_equal(ours[row], before)
    grey = photos.load_images(np.arange(2), (8, 8), Preprocessing(color="L"))
    assert grey.shape == (2, 8, 8, 1)
    assert view_key("RGB") == view_key(Preprocessing()) == "RGB"
    keys = {view_key(Preprocessing(resize=256, center_crop=224)), view_key(Preprocessing(resize=232, center_crop=224)),
            view_key(Preprocessing(resize=256, center_crop=224, interpolation="bicubic")),
            view_key(Preprocessing(resize=256, center_crop=224, antialias=False)), view_key("RGB"), view_key("L")}
    assert len(keys) == 6


def test_in_memory_arrays_take_the_same_geometry():
    rng = np.random.default_rng(1)
    arrays = rng.integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    prep = Preprocessing(resize=36, center_crop=32, interpolation="bicubic")
    src = ImageSource(name="mem", classes=["a"], labels=np.zeros(3, np.int64), arrays=arrays)
    got = src.load_images(np.arange(3), (32, 32), prep)
    want = np.stack([to_input_size(Image.fromarray(a), (32, 32), prep) for a in arrays])
    assert np.array_equal(got, want) and np.array_equal(_resize_stack(arrays, (32, 32), prep), want)


def test_geometry_that_cannot_give_the_input_size_is_refused_at_decode(photos):
    with pytest.raises(DataError, match=r"center_crop gives 224x224 images, but the model takes 32x32"):
        photos.load_images(np.arange(1), (32, 32), Preprocessing(resize=256, center_crop=224))
    with pytest.raises(DataError, match=r"smaller than center_crop 300x300: give resize too"):
        photos.load_images(np.arange(len(photos)), (300, 300), Preprocessing(center_crop=300))


# ---------------------------------------------------------------------- channel order (color: BGR)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("fields, size", [
    ({"resize": 240, "center_crop": [200, 220], "interpolation": "bicubic"}, (200, 220)),
    ({"resize": 256, "center_crop": 224, "antialias": False}, (224, 224)),
    ({}, (48, 64)),  # straight to the input size
])
def test_bgr_is_the_rgb_tensor_with_its_channels_reversed(photos, fields, size):
    """Non-square photos: the tensor fed with color BGR (mean and std written in B, G, R order) is the RGB
    tensor with its channel axis reversed, and torchvision's v2 transform of the RGB photo, reversed."""
    rgb = _ours(photos, Preprocessing(mean=MEAN, std=STD, **fields), size)
    bgr = _ours(photos, Preprocessing(color="BGR", mean=MEAN[::-1], std=STD[::-1], **fields), size)
    assert bgr.shape == rgb.shape and bgr.shape[1] == 3
    assert _max_diff(bgr, rgb.flip(1)) <= 1e-6
    if fields:
        theirs = _theirs(photos, _v2(fields["resize"], fields["center_crop"], fields.get("interpolation", "bilinear"),
                                     fields.get("antialias", True), tensor_first=not fields.get("antialias", True)))
        assert _max_diff(bgr, theirs.flip(1)) <= TOLERANCE


def test_bgr_in_memory_arrays_and_a_photo_already_at_the_input_size():
    rng = np.random.default_rng(2)
    arrays = rng.integers(0, 256, (3, 30, 50, 3), dtype=np.uint8)
    src = ImageSource(name="mem", classes=["a"], labels=np.zeros(3, np.int64), arrays=arrays)
    for prep, size in ((Preprocessing(resize=[36, 40], center_crop=[28, 32]), (28, 32)), (Preprocessing(), (30, 50))):
        bgr = Preprocessing(**{**prep.model_dump(), "color": "BGR"})
        want = src.load_images(np.arange(3), size, prep)[..., ::-1]
        assert np.array_equal(src.load_images(np.arange(3), size, bgr), want)
        assert np.array_equal(_resize_stack(arrays, size, bgr), want)
    assert np.array_equal(src.load_images(np.arange(3), (30, 50), "BGR"), arrays[..., ::-1])


def test_rgb_and_bgr_decodes_are_kept_apart(photos, tmp_path, monkeypatch):
    """The decoded-image store and the in-process caches key RGB and BGR apart: a BGR run after an RGB
    one of the same photos, size and geometry reads B, G, R."""
    from compressor import streaming
    from compressor.streaming import ImageSet, _store_path

    monkeypatch.setenv("COMPRESSOR_DATA_WORKERS", "0")
    monkeypatch.setattr(streaming, "MIN_STORE_IMAGES", 1)  # these few photos get a store on disk
    geometry = {"resize": 36, "center_crop": 32}
    rgb, bgr = Preprocessing(**geometry), Preprocessing(color="BGR", **geometry)
    assert view_key("RGB") != view_key("BGR") and view_key(rgb) != view_key(bgr)
    stores = [_store_path(photos, (32, 32), view, "all") for view in (rgb, bgr)]
    assert stores[0] != stores[1]
    first = ImageSet(photos, None, (32, 32), rgb)[:]
    assert stores[0].is_file() and not stores[1].exists()
    again = ImageSet(photos, None, (32, 32), bgr)[:]
    assert np.array_equal(again, first[..., ::-1]) and stores[1].is_file()
    assert np.array_equal(ImageSet(photos, None, (32, 32), bgr)[:], again)  # read back from its own store
    assert ImageSet(photos, None, (32, 32), rgb).fingerprint() != ImageSet(photos, None, (32, 32), bgr).fingerprint()


def test_bgr_beside_from_takes_the_librarys_mean_and_std_in_bgr_order():
    rgb = Preprocessing(**{"from": "torchvision:ResNet50_Weights.IMAGENET1K_V2"})
    bgr = Preprocessing(**{"from": "torchvision:ResNet50_Weights.IMAGENET1K_V2", "color": "BGR"})
    assert (bgr.mean, bgr.std) == (rgb.mean[::-1], rgb.std[::-1]) and bgr.resize == rgb.resize
    written = Preprocessing(**{"from": "torchvision:resnet50", "color": "BGR", "mean": [0.1, 0.2, 0.3]})
    assert written.mean == [0.1, 0.2, 0.3] and written.std == rgb.std[::-1]


# ---------------------------------------------------------------------- model.json and the recipe


def _tiny(tmp_path, meta: dict | None):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_cnn().eval(), path)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_model_json_carries_from_and_the_recipe_overrides_it(tmp_path):
    path = _tiny(tmp_path, {"preprocessing": {"from": "torchvision:EfficientNet_B0_Weights.IMAGENET1K_V1"}})
    art = load_model(path, trust=True)
    prep = art.preprocessing
    assert (prep.resize, prep.center_crop, prep.interpolation) == (256, 224, "bicubic")
    # the crop gives the input shape where nothing else does
    assert art.input_spec.shape == [1, 3, 224, 224] and art.meta["input_shape_source"] == "preprocessing"
    recipe_prep = Preprocessing(resize=36, center_crop=32)
    art = load_model(path, trust=True, preprocessing=recipe_prep, input_shape=[1, 3, 32, 32])
    assert art.preprocessing == recipe_prep and art.input_spec.shape == [1, 3, 32, 32]


def test_model_json_color_bgr_is_read_and_a_bad_one_refused(tmp_path):
    path = _tiny(tmp_path, {"preprocessing": {"color": "BGR", "resize": 36, "center_crop": 32}})
    art = load_model(path, trust=True)
    assert art.preprocessing.color == "BGR" and art.input_spec.shape == [1, 3, 32, 32]
    path = _tiny(tmp_path, {"input_shape": [1, 3, 32, 32], "preprocessing": {"color": "bgr"}})
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, trust=True)
    assert "\n" not in str(caught.value)
    assert "preprocessing.color: give RGB, BGR (channels B, G, R, as OpenCV loads images) or L (grey), got 'bgr'" \
        in str(caught.value)


def test_a_crop_that_is_not_the_models_input_size_is_refused_at_load(tmp_path):
    path = _tiny(tmp_path, {"input_shape": [1, 3, 32, 32],
                            "preprocessing": {"from": "torchvision:ResNet50_Weights.IMAGENET1K_V2"}})
    with pytest.raises(ModelLoadError, match=r"center_crop gives 224x224 images, but the model takes 32x32.*"
                                             r"model.json.*preprocessing by tiny.json"):
        load_model(path, trust=True)


# ---------------------------------------------------------------------- refusals, through the CLI

RECIPE = """
name: prep
data:
  source: digits
  calibration: {samples: 16}
  evaluation: {limit: 20}
preprocessing: PREP
targets:
  - onnxruntime
"""


@pytest.mark.parametrize("prep, expected", [
    ("{from: 'keras:ResNet50'}", "preprocessing: from: unknown library 'keras' in 'keras:ResNet50': give "
                                 "torchvision:... or timm:..."),
    ("{from: 'torchvision:ResNet50_Weights.IMAGENET9K'}",
     "preprocessing: from: torchvision's ResNet50_Weights has no weights 'IMAGENET9K': it has IMAGENET1K_V1, "
     "IMAGENET1K_V2, DEFAULT"),
    ("{from: 'torchvision:Resnet50_Weights.IMAGENET1K_V2'}",
     "torchvision has no image-classification weights 'Resnet50_Weights' (did you mean ResNet50_Weights"),
    ("{resize: 0, center_crop: 224}", "preprocessing: resize: give a positive int (the shorter side) or "
                                      "[height, width] of positive ints, got 0"),
    ("{resize: 256}", "preprocessing: resize: 256 sets the shorter side only"),
    ("{resize: 200, center_crop: 224}", "preprocessing: center_crop: 224x224 is larger than the resized image "
                                        "(shorter side 200)"),
    ("{resize: [300, 200], center_crop: [224, 224]}", "center_crop: 224x224 is larger than the resized image "
                                                      "(300x200)"),
    ("{interpolation: lanczos}", "preprocessing.interpolation: Input should be 'bilinear', 'bicubic' or 'nearest'"),
    ("{color: bgr}", "preprocessing.color: give RGB, BGR (channels B, G, R, as OpenCV loads images) or L (grey), "
                     "got 'bgr'"),
    ("{color: RGBA}", "preprocessing.color: give RGB, BGR"),
    ("{color: [B, G, R]}", "preprocessing.color: give RGB, BGR"),
])
def test_bad_preprocessing_is_one_line_exit_2(tmp_path, capsys, prep, expected):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("PREP", prep))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert expected in line


def test_from_timm_without_timm_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, installed or not
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("PREP", "{from: 'timm:resnet50.a1_in1k'}"))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "from: timm:resnet50.a1_in1k needs timm, which is not installed here: pip install timm" in line


def test_unknown_timm_model_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("timm", reason="timm is not installed (pip install 'compressor[timm]')")
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("PREP", "{from: 'timm:resnet50.nope'}"))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "from: timm's resnet50 has no pretrained tag 'nope': it has a1_in1k" in line


def test_a_crop_that_is_not_the_input_size_is_refused_through_the_cli(tmp_path, capsys):
    model = _tiny(tmp_path, {"input_shape": [1, 3, 16, 16]})
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("PREP", "{resize: 256, center_crop: 224}"))
    out = tmp_path / "out"
    line = one_error_line(*cli(capsys, model, "-r", recipe, "--trust-model", "-q", "-o", out,
                               "--cache-dir", tmp_path / "cache"))
    assert "preprocessing.center_crop gives 224x224 images, but the model takes 16x16" in line
    assert "preprocessing by the recipe" in line
    assert not out.exists()


def test_library_fields_read_metadata_only(monkeypatch):
    """The weight enum and timm's pretrained config carry the transform: nothing is downloaded."""
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    fields = library_fields("torchvision:ResNet50_Weights.IMAGENET1K_V2")
    assert fields["resize"] == 232 and fields["center_crop"] == 224 and fields["interpolation"] == "bilinear"
    assert fields["antialias"] is True and fields["std"] == [0.229, 0.224, 0.225]
    try:
        import huggingface_hub
        import timm  # noqa: F401
    except ImportError:
        return
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    assert library_fields("timm:resnet50.a1_in1k")["resize"] == 235
