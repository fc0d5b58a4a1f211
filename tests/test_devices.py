"""Issue 14, part 1: the device an engine is for decides its device-dependent settings, never the
machine that builds it. The host's CPU flags are mocked (an AMX Xeon, an AVX2-only EPYC) to show
that an engine built for one device is the same bytes on either."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor import devices
from compressor.data import DataConfig, open_data
from compressor.devices import DEVICES, host_device, resolve
from compressor.intake import load_model
from compressor.pass_base import PassContext
from compressor.registry import get_pass, get_target

from .conftest import TINY_RECIPE, cli, one_error_line, write_recipe

AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}))


def as_host(monkeypatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")


def test_host_profiles_follow_the_cpu_flags():
    assert host_device(AMX, "x86_64").name == "x86-amx"
    assert host_device(AVX2, "x86_64").name == "x86-avx2"
    assert host_device(frozenset({"avx2", "avx512f", "avx512_vnni"}), "x86_64").name == "x86-avx512-vnni"
    assert host_device(frozenset({"avx2", "avx512_vnni", "avx512_bf16"}), "x86_64").name == "x86-avx512-bf16"
    assert host_device(frozenset(), "aarch64").name == "arm64"
    assert DEVICES["x86-avx2"].reduce_range and not DEVICES["x86-amx"].reduce_range
    assert not DEVICES["arm64"].reduce_range  # ARM's dot products accumulate in 32 bits
    assert DEVICES["x86-amx"].native_bf16 and not DEVICES["x86-avx512-vnni"].native_bf16
    with pytest.raises(ValueError, match="unknown device 'pentium'"):
        resolve("pentium")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_an_engine_for_a_device_is_the_same_bytes_on_any_build_host(backend, model_files, digits, tmp_path,
                                                                     monkeypatch):
    """quantize_ptq for x86-avx2 on a mocked AMX host and on a mocked AVX2 host: identical files,
    with the AVX2 device's settings (7-bit weights / NNCF's first-layer overflow fix) on both; for
    x86-amx the settings differ (8-bit weights / no overflow fix)."""
    src = model_files["onnx"] if backend == "onnxruntime" else model_files["pickle"]
    art = load_model(src, trust=True)
    built = {}
    for host, flags in (("amx", AMX), ("avx2", AVX2)):
        as_host(monkeypatch, flags)
        for device in ("x86-avx2", "x86-amx"):
            ctx = PassContext(work_dir=tmp_path / f"{host}-{device}", data=digits, device=resolve(device))
            ctx.work_dir.mkdir()
            res = get_pass("quantize_ptq")(backend=backend)(art, ctx)
            files = sorted(res.artifact.path.parent.glob("model.*"))
            built[host, device] = ({f.suffix: f.read_bytes() for f in files}, res.metrics)
    for device in ("x86-avx2", "x86-amx"):
        assert built["amx", device][0] == built["avx2", device][0], device
        assert built["amx", device][1]["device"] == device
    assert built["amx", "x86-avx2"][0] != built["amx", "x86-amx"][0]
    if backend == "onnxruntime":
        assert built["amx", "x86-avx2"][1]["reduce_range"] is True
        assert built["amx", "x86-amx"][1]["reduce_range"] is False


def test_the_device_keys_the_pass_cache(model_files, digits):
    from compressor.pass_cache import PassCache

    art = load_model(model_files["onnx"])
    p = get_pass("quantize_ptq")(backend="onnxruntime")
    cache = PassCache(Path("/nonexistent"))
    avx2, amx = resolve("x86-avx2"), resolve("x86-amx")
    assert cache.key(p, art, digits, device_profile=avx2) != cache.key(p, art, digits, device_profile=amx)
    fuse = get_pass("fuse")()
    assert cache.key(fuse, art, digits, device_profile=avx2) == cache.key(fuse, art, digits, device_profile=amx)


def test_bf16_is_not_built_for_a_device_without_it(model_files, tmp_path, monkeypatch):
    from compressor.errors import TargetUnavailable

    art = load_model(model_files["pickle"], trust=True)
    t = get_target("openvino")(precision_hint="bf16")
    t.device = resolve("x86-avx512-vnni")
    with pytest.raises(TargetUnavailable, match="device x86-avx512-vnni has none"):
        t.build(art, tmp_path)
    as_host(monkeypatch, AVX2)  # a bf16 device, built here on an AVX2 machine: it could not be measured as bf16
    t.device = resolve("x86-amx")
    with pytest.raises(TargetUnavailable, match=r"this machine \(x86-avx2\) has no native bf16"):
        t.build(art, tmp_path)
    assert not any(tmp_path.iterdir())


def test_recipe_device_and_the_command_line_override_reach_the_report(model_files, tmp_path, capsys, monkeypatch):
    as_host(monkeypatch, AMX)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE.replace("name: tiny", "name: tiny\ndevice: x86-amx"))
    code, out, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out",
                         tmp_path / "o", "--device", "x86-avx2", "-q")
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["device"]["name"] == "x86-avx2" and report["device"]["host"] == "x86-amx"
    assert not report["device"]["host_is_device"]
    assert all(r["measured_on"] == "x86-amx" for r in report["results"])
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Latency was measured on this machine (x86-amx), not on the device" in md
    ptq = next(p for p in report["passes"] if p["name"] == "quantize_ptq")
    assert ptq["metrics"]["device"] == "x86-avx2"


def test_an_unknown_device_is_one_line(model_files, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE.replace("name: tiny", "name: tiny\ndevice: pentium"))
    line = one_error_line(*cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out",
                               tmp_path / "o"))
    assert "unknown device 'pentium'" in line and "x86-avx2" in line
    assert not (tmp_path / "o").exists()
