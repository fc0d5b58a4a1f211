"""Faults a user meets (issue 21): a real full disk under the pass cache and under --out, models
that return more than one logits tensor, non-finite weights, build-engine on a finished engine.

Every refusal is run through the CLI as a user would: exit 2, one line on stderr, no traceback,
nothing half-written left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from .conftest import PREP, SHAPE, one_error_line, write_recipe
from .test_bad_input import FAST_RECIPE, _leftovers, _run


@pytest.fixture
def fast_recipe(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    return write_recipe(d / "fast.yaml", FAST_RECIPE)


# ------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_fs(tmp_path):
    """``make(name, free_bytes)``: a directory on a real tmpfs of its own with about ``free_bytes``
    left (the rest taken by a filler file). Needs the right to mount (root, or CAP_SYS_ADMIN);
    skipped with the reason where it is not given."""
    mounted: list[Path] = []

    def make(name: str, free_bytes: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        size = 4 * 1024 * 1024
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a small tmpfs here: no mount command")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {(r.stderr or r.stdout).strip() or r.returncode}")
        mounted.append(d)
        st = os.statvfs(d)
        with open(d / ".filler", "wb") as fh:
            fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free_bytes))
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != ".filler")


def test_real_full_disk_under_the_pass_cache(tmp_path, capsys, model_files, fast_recipe, small_fs):
    cache = small_fs("cache", 8 * 1024)  # room for the probe, not for the fused model
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, model_files["pickle"], fast_recipe, out, "--cache-dir", cache)
    line = one_error_line(code, stdout, err)
    assert "pass cache entry" in line and "--no-cache" in line
    assert _entries(cache) == []  # no half-written entry, no staging left
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.fixture
def wide_model(tmp_path) -> Path:
    """An untrained pickled model of about 800 KB (a wide linear layer): its engine is far larger
    than a run's report, so a disk can hold the report and not the engine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    d = tmp_path / "models"
    d.mkdir(exist_ok=True)
    torch.save(model, d / "wide.pt")
    (d / "wide.json").write_text(json.dumps({"input_shape": SHAPE, "preprocessing": PREP.model_dump(),
                                             "classes": [str(i) for i in range(10)]}))
    return d / "wide.pt"


def test_real_full_disk_under_out(tmp_path, capsys, wide_model, fast_recipe, small_fs):
    disk = small_fs("disk", 256 * 1024)  # room for a report, not for the 800 KB engine
    out = disk / "out"
    code, stdout, err = _run(capsys, wide_model, fast_recipe, out, "--cache-dir", tmp_path / "cache")
    line = one_error_line(code, stdout, err)  # was: exit 1 and a report of 0 engines
    assert "No space left on device" in line and ".partial-" not in line
    assert f"cannot write engine {out}/engines/" in line  # where it was to go
    assert _entries(disk) == []  # nothing left: neither the output nor its staging
