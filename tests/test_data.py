import numpy as np
import pytest

from compressor.artifact import Preprocessing
from compressor.data import DataConfig, digits_source, open_data, preprocess, scan_image_folder
from compressor.errors import DataError


def test_balanced_indices_are_balanced_seeded_and_distinct():
    src = digits_source("train")
    idx = src.balanced_indices(100, seed=3)
    counts = np.bincount(src.labels[idx], minlength=10)
    assert counts.min() == counts.max() == 10
    assert len(set(idx.tolist())) == 100
    assert np.array_equal(idx, src.balanced_indices(100, seed=3))
    assert not np.array_equal(idx, src.balanced_indices(100, seed=4))


def test_digits_splits_are_disjoint_and_stratified():
    train, test = digits_source("train"), digits_source("test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.25) < 0.01
    assert train.classes == test.classes == [str(i) for i in range(10)]


def test_preprocess_scales_then_normalises():
    img = np.full((1, 2, 2, 3), 255, np.uint8)
    x = preprocess(img, Preprocessing(mean=[0.5, 0.0, 1.0], std=[0.5, 1.0, 2.0]))
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, 1.0, 0.0], atol=1e-6)


def test_image_folder(image_folder):
    src = scan_image_folder(image_folder / "train", "train")
    assert src.classes == ["cat", "dog", "emu"] and len(src) == 24
    imgs = src.load_images(np.array([0, 8, 16]), (20, 20), "RGB")
    assert imgs.shape == (3, 20, 20, 3)
    # the class's colour channel dominates
    assert [int(np.argmax(im.mean(axis=(0, 1)))) for im in imgs] == [0, 1, 2]
    bundle = open_data(DataConfig(source="folder", root=str(image_folder), calibration={"samples": 6}))
    cal = bundle.calibration_images((12, 12), "RGB")
    assert cal.shape == (6, 12, 12, 3)
    x, y = bundle.evaluation_set((12, 12), "RGB")
    assert len(x) == 12 and sorted(np.bincount(y).tolist()) == [4, 4, 4]


def test_image_folder_fingerprint_follows_files_not_copies(image_folder, tmp_path):
    """A copy of the tree (new modification times) keeps the fingerprint, so caches and run
    comparisons survive a re-copied data set; a renamed, added or rewritten image changes it."""
    import os
    import shutil

    first = scan_image_folder(image_folder / "train", "train").fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(image_folder / "train", copy)
    for f in copy.rglob("*.png"):
        os.utime(f, (1_000_000, 1_000_000))
    assert scan_image_folder(copy, "train").fingerprint == first
    (copy / "cat" / "000.png").write_bytes((image_folder / "train" / "dog" / "000.png").read_bytes())  # rewritten
    assert scan_image_folder(copy, "train").fingerprint != first
    shutil.copy(copy / "dog" / "001.png", copy / "dog" / "999.png")
    changed = scan_image_folder(copy, "train").fingerprint
    (copy / "dog" / "999.png").rename(copy / "dog" / "998.png")
    assert len({first, changed, scan_image_folder(copy, "train").fingerprint}) == 3


def test_missing_data_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_data(DataConfig(source="folder", root=str(tmp_path / "nowhere")))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no test/ directory"):
        open_data(DataConfig(source="folder", root=str(tmp_path / "only_train")))


def test_cifar10_by_name_without_network_or_local_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        open_data(DataConfig(source="cifar10", download=False))


def test_cifar10_by_name_finds_an_image_folder_copy(image_folder):
    bundle = open_data(DataConfig(source="cifar10", root=str(image_folder)))
    assert bundle.classes == ["cat", "dog", "emu"]


def test_validation_on_a_share_of_the_evaluation_split_is_never_evaluated():
    """data.validation.split = the evaluation split: that share validates budgets, and the evaluated
    images are the others (with and without evaluation.limit), so a test figure stays on unseen images."""
    bundle = open_data(DataConfig(source="digits", validation={"split": "test", "share": 0.4, "seed": 3}))
    test = bundle.evaluation_source
    assert bundle.validation_mode == "evaluation"
    pool = bundle._validation_part()
    assert len(pool) == round(0.4 * len(test))
    val = bundle.validation_indices(100)
    assert len(val) == 100 and set(val) <= set(pool)
    evaluated = bundle.evaluation_indices()
    assert not set(evaluated) & set(pool) and len(evaluated) + len(pool) == len(test)
    assert bundle.validation_available() == len(pool)
    images = bundle.validation_images((8, 8), "L", 20)
    assert np.array_equal(images.labels, test.labels[bundle.validation_indices(20)])
    assert "left out of evaluation" in bundle.validation_where()
    limited = open_data(DataConfig(source="digits", validation={"split": "test"}, evaluation={"limit": 50}))
    assert len(limited.evaluation_indices()) == 50
    assert not set(limited.evaluation_indices()) & set(limited._validation_part())


def test_validation_on_a_split_of_its_own(image_folder):
    """A val/ folder beside train/ and test/: every validation image comes from it, evaluation is whole."""
    import shutil

    shutil.copytree(image_folder / "test", image_folder / "val")
    bundle = open_data(DataConfig(source="folder", root=str(image_folder), calibration={"samples": 6},
                                  validation={"split": "val"}))
    assert bundle.validation_mode == "own" and bundle.validation_available() == 12
    assert len(bundle.evaluation_indices()) == 12
    images = bundle.validation_images((12, 12), "RGB", 12)
    assert all("val" in str(p) for p in images.source.paths)
    default = open_data(DataConfig(source="folder", root=str(image_folder), calibration={"samples": 6}))
    assert default.validation_mode == "calibration" and default.validation_available() == 24 - 6


def test_a_missing_validation_split_is_a_data_error(image_folder):
    with pytest.raises(DataError, match="data.validation.split: .* has no val/ directory"):
        open_data(DataConfig(source="folder", root=str(image_folder), validation={"split": "val"}))
