"""Nothing lost, nothing half-written, never a traceback (issue 10): the output directory rule,
unwritable paths checked before anything runs, a full disk, kill -9 leftovers, permissions.

Every case is run through the CLI as a user would: exit 2, one line on stderr, nothing of the
user's touched and nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor.cli import main
from compressor.staging import _HOST

from .conftest import cli, one_error_line, write_recipe

FAST_RECIPE = """
name: fast
data:
  source: digits
  calibration: {samples: 32}
  evaluation: {limit: 60}
passes:
  - fuse
targets:
  - onnxruntime
evaluation:
  batch_size: 64
  warmup: 1
  latency_runs: 10
  latency_min_seconds: 0
  throughput_batch: 4
  throughput_seconds: 0.01
"""


@pytest.fixture
def fast_recipe(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    return write_recipe(d / "fast.yaml", FAST_RECIPE)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def _run(capsys, model, recipe, out, *extra):
    return cli(capsys, model, "-r", recipe, "--trust-model", "-q", "-o", out, *extra)


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write into, as root too (root ignores mode bits)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        try:
            (candidate / ".compressor-write-test").mkdir()
        except OSError:
            yield candidate
            return
        (candidate / ".compressor-write-test").rmdir()
    pytest.skip("no read-only directory found: running as root on a machine where /sys is writable")


# ------------------------------------------------------------------ the output directory rule


def test_out_dir_with_foreign_files_is_refused_and_kept(tmp_path, capsys, model_files, fast_recipe):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(out)
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out))
    assert "not a compressor run" in line and "notes.txt" in line
    assert _tree(out) == before and _leftovers(tmp_path) == []


def test_out_dir_holding_the_model_is_refused_before_the_run(tmp_path, capsys, model_files, fast_recipe):
    """compress /tmp/x/model.pt -o /tmp/x used to delete the input model itself."""
    folder = tmp_path / "x"
    folder.mkdir()
    model = folder / "model.pt"
    model.write_bytes(model_files["pickle"].read_bytes())
    model.with_suffix(".json").write_text(model_files["pickle"].with_suffix(".json").read_text())
    before = _tree(folder)
    line = one_error_line(*_run(capsys, model, fast_recipe, folder, "--overwrite"))
    assert "holds the model file" in line
    assert _tree(folder) == before
    assert not (tmp_path / "cache").exists()  # refused before any pass ran (nothing cached)


def test_out_dir_equal_to_the_recipe_folder_is_refused(tmp_path, capsys, model_files, fast_recipe):
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, fast_recipe.parent, "--overwrite"))
    assert "holds the recipe" in line
    assert fast_recipe.is_file() and _leftovers(tmp_path) == []


def test_out_dot_is_refused(tmp_path, capsys, model_files, fast_recipe, monkeypatch):
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, ".", "--overwrite"))
    assert "current directory" in line
    assert here.is_dir() and list(here.iterdir()) == [] and _leftovers(tmp_path) == []


def test_out_naming_a_file_is_refused_and_the_file_kept(tmp_path, capsys, model_files, fast_recipe):
    out = tmp_path / "results"
    out.write_text("a file of mine")
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out, "--overwrite"))
    assert "not a directory" in line
    assert out.read_text() == "a file of mine"
    assert _leftovers(tmp_path) == []


def test_previous_run_needs_overwrite_and_extra_files_block_it(tmp_path, capsys, model_files, fast_recipe):
    out = tmp_path / "out"
    code, _, err = _run(capsys, model_files["pickle"], fast_recipe, out)
    assert code == 0, err
    first = json.loads((out / "report.json").read_text())
    assert set(first["outputs"]) == {p.name for p in out.iterdir()}

    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out))
    assert "holds a previous run" in line and "--overwrite" in line
    assert json.loads((out / "report.json").read_text())["created"] == first["created"]

    time.sleep(1.1)  # report timestamps have one-second resolution
    code, _, err = _run(capsys, model_files["pickle"], fast_recipe, out, "--overwrite")
    assert code == 0, err
    second = json.loads((out / "report.json").read_text())
    assert second["created"] != first["created"]
    assert _leftovers(tmp_path) == []

    (out / "my-analysis.csv").write_text("a,b\n")
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out, "--overwrite"))
    assert "other files" in line and "my-analysis.csv" in line
    assert (out / "my-analysis.csv").read_text() == "a,b\n"
    assert json.loads((out / "report.json").read_text())["created"] == second["created"]


def test_empty_out_dir_is_used(tmp_path, capsys, model_files, fast_recipe):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = _run(capsys, model_files["pickle"], fast_recipe, out)
    assert code == 0, err
    assert (out / "report.json").is_file() and (out / "engines").is_dir()


# ------------------------------------------------------------------ unwritable paths, full disks


def test_readonly_out_is_refused_before_loading(tmp_path, capsys, model_files, fast_recipe, readonly_dir,
                                                monkeypatch):
    import compressor.job

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(compressor.job, "load_model", loaded)
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, readonly_dir / "out"))
    assert "cannot write output directory" in line and "not writable" in line


def test_readonly_cache_is_refused_before_loading(tmp_path, capsys, model_files, fast_recipe, readonly_dir,
                                                  monkeypatch):
    import compressor.job

    monkeypatch.setattr(compressor.job, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out,
                                 "--cache-dir", readonly_dir / "cache"))
    assert "pass cache" in line and "not writable" in line
    assert not out.exists()


def test_full_disk_under_the_pass_cache(tmp_path, capsys, model_files, fast_recipe, monkeypatch):
    from compressor.artifact import ModelArtifact

    def full(self, path):
        (Path(path) / "half-written.bin").write_bytes(b"\x00" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ModelArtifact, "save", full)
    cache, out = tmp_path / "cache", tmp_path / "out"
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out, "--cache-dir", cache))
    assert "pass cache entry" in line and "No space left on device" in line and "--no-cache" in line
    assert list(cache.iterdir()) == []  # no half-written entry
    assert not out.exists() and _leftovers(tmp_path) == []


def test_full_disk_under_out_fails_cleanly(tmp_path, capsys, model_files, fast_recipe, monkeypatch):
    import builtins

    import compressor.staging

    def full_open(file, mode="r", *args, **kwargs):  # the disk fills while the report is written
        if "w" in mode and Path(file).parent.name.startswith(".out.partial-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(compressor.staging, "open", full_open, raising=False)
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out))
    assert "No space left on device" in line
    assert f"{out}/report.json" in line and ".partial-" not in line  # where it was to go
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.fixture
def finished_run(tmp_path, capsys, model_files, fast_recipe):
    out = tmp_path / "run"
    code, _, err = _run(capsys, model_files["pickle"], fast_recipe, out)
    assert code == 0, err
    return out


@pytest.mark.parametrize("option", ["--json", "--markdown", "--junit"])
def test_compare_to_an_unwritable_path_fails_before_the_table(capsys, finished_run, readonly_dir, option):
    code, out, err = cli(capsys, "compare", finished_run, "--baseline", finished_run, option,
                          readonly_dir / "cmp.out")
    line = one_error_line(code, out, err)
    assert option in line and "not writable" in line
    assert out == ""  # refused before the comparison was printed


def test_build_engine_on_a_corrupt_engine_json(tmp_path, capsys, finished_run):
    engine = next((finished_run / "engines").iterdir())
    (engine / "engine.json").write_text('{"target": "onnxrun')
    line = one_error_line(*cli(capsys, "build-engine", engine))
    assert "engine.json" in line and "not a valid" in line


def test_baseline_update_over_a_file_is_refused(tmp_path, capsys, finished_run):
    target = tmp_path / "base"
    target.write_text("mine")
    one_error_line(*cli(capsys, "baseline", "update", finished_run, target))
    assert target.read_text() == "mine" and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ leftovers of killed runs


def test_stale_staging_and_run_dirs_of_dead_processes_are_swept(tmp_path, capsys, model_files, fast_recipe,
                                                                 monkeypatch):
    import tempfile

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    dead = 2**22 + 12345  # above the default pid_max of 4194304: no such process
    out = tmp_path / "out"
    stale = [tmp_path / f".out.partial-{_HOST}-{dead}", tmpdir / f"compressor-run-{_HOST}-{dead}-abc"]
    alive = tmp_path / f".out.partial-{_HOST}-{os.getppid()}"  # a live process's: not ours to remove
    for d in (*stale, alive):
        d.mkdir()
        (d / "big.bin").write_bytes(b"\x00" * 1000)
    code, _, err = _run(capsys, model_files["pickle"], fast_recipe, out)
    assert code == 0, err
    assert not any(d.exists() for d in stale)
    assert alive.exists()
    assert list(tmpdir.iterdir()) == []  # the run's own temporary work is gone too


def test_temporary_work_is_removed_when_a_pass_fails(tmp_path, capsys, model_files, fast_recipe, monkeypatch):
    import tempfile

    from compressor.passes.fuse import Fuse

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    seen = {}

    def boom(self, artifact, ctx):
        seen["tmp"] = tempfile.gettempdir()
        (Path(tempfile.mkdtemp(prefix="pre.quant.")) / "x.onnx").write_bytes(b"\x00" * 100)  # as ORT would
        raise KeyboardInterrupt  # Ctrl-C / SIGTERM mid-pass

    monkeypatch.setattr(Fuse, "run", boom)
    out = tmp_path / "out"
    assert main([str(a) for a in [model_files["pickle"], "-r", fast_recipe, "--trust-model", "-q", "-o", out,
                                  "--no-cache"]]) == 130
    assert Path(seen["tmp"]).parent == tmpdir and Path(seen["tmp"]).name.startswith("compressor-run-")
    assert list(tmpdir.iterdir()) == []
    assert not out.exists() and _leftovers(tmp_path) == []


def test_kill_9_then_rerun_leaves_nothing_behind(tmp_path, model_files, fast_recipe):
    """A real SIGKILL mid-run: the rerun succeeds and removes the dead run's staging and temp dirs."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "COMPRESSOR_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out"
    slow = write_recipe(tmp_path / "slow.yaml", FAST_RECIPE.replace("latency_runs: 10", "latency_runs: 100000")
                        .replace("latency_min_seconds: 0", "latency_min_seconds: 600"))
    cmd = [sys.executable, "-m", "compressor", str(model_files["pickle"]), "-r", str(slow), "--trust-model", "-q",
           "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it is timing: engines staged, temp dir in use
            staged = list(tmp_path.glob(".out.partial-*/engines/*/engine.json"))
            if staged and list(tmpdir.glob("compressor-run-*")):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached its measurement")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _leftovers(tmp_path) and list(tmpdir.glob("compressor-run-*"))  # what kill -9 leaves
    rerun = subprocess.run(cmd[:-4] + ["-r", str(fast_recipe), "--trust-model", "-q", "-o", str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(tmp_path) == [] and list(tmpdir.iterdir()) == []
    assert (out / "report.json").is_file()


# ------------------------------------------------------------------ permissions


def test_outputs_get_the_users_umask(tmp_path, capsys, model_files, fast_recipe):
    old = os.umask(0o022)
    try:
        out, cache = tmp_path / "out", tmp_path / "cache"
        code, _, err = _run(capsys, model_files["pickle"], fast_recipe, out, "--cache-dir", cache)
        assert code == 0, err
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(out) == 0o755
    assert mode(out / "report.json") == 0o644 and mode(out / "report.md") == 0o644
    engine = next((out / "engines").iterdir())
    assert mode(out / "engines") == 0o755 and mode(engine) == 0o755
    assert mode(engine / "engine.json") == 0o644
    entry = next(cache.iterdir())
    assert mode(entry) == 0o755


# ------------------------------------------------------------------ issue 21: refused before anything runs


def test_a_target_outside_the_devices_profile_is_refused(tmp_path, capsys, model_files):
    """`device: jetson-orin` runs TensorRT and ONNX Runtime engines, not OpenVINO: validate and the run
    both refuse, before anything runs; --device names the device for the check as it does for the run."""
    recipe = write_recipe(tmp_path / "jetson.yaml",
                          FAST_RECIPE.replace("name: fast", "name: fast\ndevice: jetson-orin")
                          .replace("  - onnxruntime\n", "  - onnxruntime\n  - openvino\n"))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "targets[1].openvino: device 'jetson-orin' does not run 'openvino' engines" in line
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model_files["pickle"], recipe, out))
    assert "device 'jetson-orin'" in line and not out.exists()
    ov = write_recipe(tmp_path / "ov.yaml", FAST_RECIPE.replace("  - onnxruntime\n", "  - openvino\n"))
    line = one_error_line(*_run(capsys, model_files["pickle"], ov, out, "--device", "arm64"))
    assert "targets[0].openvino: device 'arm64' does not run 'openvino'" in line and not out.exists()


def test_device_given_twice_is_refused(tmp_path, capsys, model_files, fast_recipe):
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model_files["pickle"], fast_recipe, out, "--device", "x86-amx",
                                "--device", "x86-avx2"))
    assert "--device" in line and "given 2 times (x86-amx, x86-avx2); give it once" in line and not out.exists()
    twice = write_recipe(tmp_path / "twice.yaml", FAST_RECIPE.replace("name: fast", "name: fast\ndevice: x86-amx\n"
                                                                      "seed: 0\ndevice: x86-avx2"))
    for args in (("validate", twice), (model_files["pickle"], "-r", twice, "--trust-model", "-o", out)):
        line = one_error_line(*cli(capsys, *args))
        assert "not valid YAML at line 5, column 1: duplicate key 'device' (first given at line 3)" in line
        assert not out.exists()


def test_infinite_max_drop_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "inf.yaml", FAST_RECIPE.replace("  - onnxruntime\n",
                                                                     "  - tflite: {max_drop: .inf}\n"))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "targets[0].tflite.max_drop: must be a finite number, got inf" in line


@pytest.mark.parametrize("config", ["{quantization: fp16, max_drop: 0.5}",
                                    "{int8_method: ai_edge_quantizer, max_drop: 0.5}"])
def test_tflite_max_drop_nothing_honours_is_refused(tmp_path, capsys, config):
    recipe = write_recipe(tmp_path / "t.yaml", FAST_RECIPE.replace("  - onnxruntime\n", f"  - tflite: {config}\n"))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "targets[0].tflite" in line and "max_drop applies to" in line and "remove max_drop" in line


def test_require_targets_refuses_bf16_for_a_device_without_it_before_running(tmp_path, capsys, model_files,
                                                                              fast_recipe):
    """openvino bf16 for x86-avx2 can never be built: with --require-targets that is known before any pass."""
    recipe = write_recipe(tmp_path / "bf16.yaml", FAST_RECIPE.replace("  - onnxruntime\n",
                                                                      "  - openvino: {precision_hint: bf16}\n"))
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model_files["pickle"], recipe, out, "--device", "x86-avx2",
                                "--require-targets", "--cache-dir", tmp_path / "cache"))
    assert "targets[0].openvino: target 'openvino' cannot build here" in line and "device x86-avx2 has none" in line
    assert "--require-targets" in line
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing ran


def test_json_files_are_strict_json(tmp_path, finished_run):
    """NaN and infinity are not JSON: a measurement that comes out non-finite is written as null, and
    every JSON file a run writes parses with a strict parser."""
    from compressor.report import write_report

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))

    report = json.loads((finished_run / "report.json").read_text())
    report["results"][0]["output_sqnr_db"] = float("inf")
    report["results"][0]["latency_ms"]["p50"] = float("nan")
    write_report(report, tmp_path)
    again = strict((tmp_path / "report.json").read_text())
    assert again["results"][0]["output_sqnr_db"] is None and again["results"][0]["latency_ms"]["p50"] is None
    for path in finished_run.rglob("*.json"):
        strict(path.read_text())
