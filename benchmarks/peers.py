"""Issue #5, peer benchmark: the project's shipped recipes against what a user gets from each
library's own defaults, on the same model, data, thread count and machine, in one measurement
session (batch-1 latency timed in rounds interleaved over every row).

Peers (each library's defaults; see PEERS below for exactly what each one does): PyTorch eager
FP32, torch.compile FP32, ONNX Runtime FP32, OpenVINO FP32, NNCF PTQ into OpenVINO, ONNX Runtime
quantize_static, PT2E with the X86InductorQuantizer then torch.compile, TFLite INT8 (the
project's tflite target) and ExecuTorch INT8 (the project's executorch target). Ours: every engine
of the shipped recipes cpu_targets_side_by_side and int8_cpu_openvino, built by the CLI and loaded
again here.

Asked, per model: no peer is both more accurate and faster (batch-1 p50) than our best row, i.e.
our best lies on the Pareto front of top-1 against batch-1 latency.

Usage: python benchmarks/peers.py [resnet50|mobilenetv2 ...] [--eval-limit N] [--reuse-builds]
       [--recipes NAME,...|none] [--extra-run LABEL=DIR ...] [--out-name NAME]
Writes benchmarks/results/peers_<model>/{report.json,report.md,pareto_<model>.png} (--out-name: under
benchmarks/results/NAME); engines and peer files go to benchmarks/work/. --extra-run adds the engines of
a finished run directory (report.json and engines/, e.g. a `compress tune` output) as rows ours:LABEL/ENGINE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _common import HERE, REPO, SHARED, require_modules, run_compress, write_text

MODELS = {"resnet50": "resnet50_cifar10.pt", "mobilenetv2": "mobilenet_v2_cifar10.pt"}
RECIPES = ("cpu_targets_side_by_side", "int8_cpu_openvino")
# the Pareto plot, the PT2E peer, the TFLite rows and the TensorRT QDQ rows of the recipes
NEEDS = ("matplotlib", "torchao", "litert_torch", "ai_edge_litert", "modelopt")
THREADS = 2
TOLERANCE = 1.0  # points of top-1 below the FP32 source that "our best" may give up
CAL = {"split": "train", "samples": 512, "seed": 0}

PEERS: dict[str, str] = {
    "pytorch-eager-fp32": (
        "the source nn.Module in eval mode, run under torch.inference_mode with torch.set_num_threads(2)"),
    "torch-compile-fp32": (
        "torch.compile(model) with its defaults (inductor, default mode, no freezing), run under "
        "torch.inference_mode; compiled on first use (batch 1 before measuring, then the batch sizes measured)"),
    "onnxruntime-fp32": (
        "torch.onnx.export(model, (x,), f, dynamic_shapes=batch dim) with its defaults otherwise (the dynamo "
        "exporter, its default opset and optimization); ONNX Runtime CPUExecutionProvider at its default graph "
        "optimization (ORT_ENABLE_ALL), intra-op threads 2"),
    "openvino-fp32": (
        "ov.convert_model(model, example_input=x), ov.save_model with its defaults (weights stored as FP16, "
        "compress_to_fp16=True; the CPU plugin computes in FP32); CPU plugin with the project's OVRunner, as our "
        "OpenVINO rows: latency hint, 1 stream, 2 threads; inference precision left at OpenVINO's own default for "
        "the CPU at hand (bf16 where the CPU has AMX / AVX512-BF16, f32 elsewhere: the row's runtime line says which)"),
    "nncf-openvino-int8": (
        "nncf.quantize(ov.convert_model(model), nncf.Dataset(calibration images, batch 1)) with nothing else "
        "(default preset, subset_size=300, fast bias correction, target device ANY), ov.save_model defaults; "
        "run as openvino-fp32"),
    "ort-quantize-static-int8": (
        "quant_pre_process(fp32.onnx, pre.onnx) then quantize_static(pre.onnx, out.onnx, reader) with its "
        "defaults (QDQ format, int8 activations and weights, MinMax calibration, per-tensor weights, "
        "reduce_range=False) on the ONNX of onnxruntime-fp32; reader: the 512 calibration images, batch 1; "
        "ONNX Runtime as onnxruntime-fp32"),
    "pt2e-x86-inductor-int8": (
        "torchao PT2E, following its X86-Inductor tutorial: torch.export.export(model, (x,), dynamic batch, "
        "strict=True).module() (non-strict if strict fails), prepare_pt2e with "
        "X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()), calibration on the "
        "512 images (batches of 32), convert_pt2e, then torch.compile(converted) with Inductor freezing on (the "
        "tutorial runs it with TORCHINDUCTOR_FREEZING=1; without freezing Inductor does not lower the int8 "
        "patterns to oneDNN kernels); run under torch.inference_mode"),
    "tflite-int8": (
        "the project's tflite target with quantization int8 and its defaults (PT2E with litert-torch's "
        "PT2EQuantizer: per-channel int8 weights, histogram-observed int8 activations, 512 calibration images), "
        "built on the unfused source; LiteRT interpreter on XNNPACK, 2 threads"),
    "executorch-int8": (
        "the project's executorch target with quantization int8 and its defaults (torch.export, PT2E with "
        "ExecuTorch's XNNPACKQuantizer: per-channel symmetric int8 weights, int8 activations, 512 calibration "
        "images; to_edge_transform_and_lower with XnnpackPartitioner), built on the unfused source; ExecuTorch's "
        "Python runtime on its XNNPACK delegate, 2 threads"),
}


@dataclass
class Row:
    """What the report says about one subject besides its measurement."""

    name: str
    kind: str  # "peer" or "ours"
    description: str
    proxy: bool = False
    build_s: float = 0.0
    cli_top1: float | None = None


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


# ---------------------------------------------------------------------------------------- peers


class PeerBuilder:
    """Builds every peer of one model; a peer that fails is recorded with its reason."""

    def __init__(self, artifact: Any, data: Any, calib: np.ndarray, work: Path) -> None:
        self.artifact = artifact
        self.data = data
        self.calib = calib
        self.work = work
        self.failed: dict[str, str] = {}
        self.onnx_path: Path | None = None
        self.onnx_error: str | None = None
        import torch

        self.example = torch.zeros(artifact.input_spec.with_batch(1))

    def module(self) -> Any:
        """A fresh copy of the source module for each peer (none of them can alter another's)."""
        import copy

        return copy.deepcopy(self.artifact.torch_module()).eval()

    def build_all(self) -> list[tuple[Any, Row]]:
        out = []
        for name, fn in (
            ("pytorch-eager-fp32", self.eager),
            ("torch-compile-fp32", self.compiled),
            ("onnxruntime-fp32", self.ort_fp32),
            ("openvino-fp32", self.ov_fp32),
            ("nncf-openvino-int8", self.nncf_int8),
            ("ort-quantize-static-int8", self.ort_int8),
            ("pt2e-x86-inductor-int8", self.pt2e_int8),
            ("tflite-int8", self.tflite_int8),
            ("executorch-int8", self.executorch_int8),
        ):
            say(f"peer {name}: building")
            t0 = time.perf_counter()
            try:
                subject = fn(f"peer:{name}")
            except Exception as exc:
                self.failed[name] = first_line(exc)
                say(f"peer {name}: FAILED: {self.failed[name]}")
                logging.debug("peer %s failed", name, exc_info=True)
                (self.work / f"{name}.error.txt").write_text(traceback.format_exc())
                continue
            row = Row(subject.name, "peer", PEERS[name], build_s=round(time.perf_counter() - t0, 1))
            say(f"peer {name}: ready in {row.build_s:.1f} s")
            out.append((subject, row))
        return out

    # -- each returns a ResultRow
    def eager(self, name: str) -> Any:
        from compressor.evaluate import ResultRow, TorchRunner

        size = int(self.artifact.meta.get("source_size_bytes", 0))
        return ResultRow(name, "torch", "fp32", TorchRunner(self.module(), threads=THREADS, name=name), size,
                       engine=self.artifact.meta.get("source_file"))

    def compiled(self, name: str) -> Any:
        import torch

        from compressor.evaluate import ResultRow, TorchRunner

        runner = TorchRunner(torch.compile(self.module()), threads=THREADS, name=name)
        t0 = time.perf_counter()
        runner(self.example.numpy())  # compiles now, so a compiler failure shows here with its reason
        size = int(self.artifact.meta.get("source_size_bytes", 0))
        return ResultRow(name, "torch.compile", "fp32", runner, size,
                       runtime={"compile_batch1_s": round(time.perf_counter() - t0, 1), "mode": "torch.compile default"})

    def _export_onnx(self) -> Path:
        if self.onnx_path is not None:
            return self.onnx_path
        if self.onnx_error is not None:
            raise RuntimeError(f"needs the ONNX export, which failed: {self.onnx_error}")
        import torch

        path = self.work / "fp32.onnx"
        try:
            dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
            torch.onnx.export(self.module(), (self.example,), str(path), dynamic_shapes=dyn)
        except Exception as exc:
            self.onnx_error = first_line(exc)
            raise
        self.onnx_path = path
        return path

    @staticmethod
    def _onnx_files(path: Path) -> list[Path]:
        return [path, *path.parent.glob(path.name + ".data")]

    def ort_fp32(self, name: str) -> Any:
        from compressor.artifact import file_size
        from compressor.evaluate import ResultRow
        from compressor.targets.onnxruntime import OrtRunner

        path = self._export_onnx()
        return ResultRow(name, "onnxruntime", "fp32", OrtRunner(path, threads=THREADS),
                       file_size(self._onnx_files(path)), engine=str(path))

    def ov_fp32(self, name: str) -> Any:
        import openvino as ov

        from compressor.artifact import file_size
        from compressor.evaluate import ResultRow
        from compressor.targets.openvino import OVRunner

        xml = self.work / "openvino-fp32" / "model.xml"
        xml.parent.mkdir(exist_ok=True)
        ov.save_model(ov.convert_model(self.module(), example_input=self.example), str(xml))
        return ResultRow(name, "openvino", "fp32", OVRunner(xml, threads=THREADS, precision_hint=None),
                       file_size([xml, xml.with_suffix(".bin")]), engine=str(xml))

    def nncf_int8(self, name: str) -> Any:
        import nncf
        import openvino as ov

        from compressor.artifact import file_size
        from compressor.evaluate import ResultRow
        from compressor.targets.openvino import OVRunner

        model = ov.convert_model(self.module(), example_input=self.example)
        items = [self.calib[i : i + 1] for i in range(len(self.calib))]
        quantized = nncf.quantize(model, nncf.Dataset(items))
        xml = self.work / "nncf-int8" / "model.xml"
        xml.parent.mkdir(exist_ok=True)
        ov.save_model(quantized, str(xml))
        return ResultRow(name, "openvino", "int8", OVRunner(xml, threads=THREADS, precision_hint=None),
                       file_size([xml, xml.with_suffix(".bin")]), engine=str(xml))

    def ort_int8(self, name: str) -> Any:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from compressor.artifact import file_size
        from compressor.evaluate import ResultRow
        from compressor.targets.onnxruntime import OrtRunner

        src = self._export_onnx()
        pre = self.work / "ort-pre.onnx"
        out = self.work / "ort-int8.onnx"
        quant_pre_process(str(src), str(pre))
        input_name = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        calib = self.calib

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.i = 0

            def get_next(self) -> dict | None:
                if self.i >= len(calib):
                    return None
                self.i += 1
                return {input_name: calib[self.i - 1 : self.i]}

        quantize_static(str(pre), str(out), Reader())
        return ResultRow(name, "onnxruntime", "int8", OrtRunner(out, threads=THREADS),
                       file_size(self._onnx_files(out)), engine=str(out))

    def pt2e_int8(self, name: str) -> Any:
        import torch

        from compressor.evaluate import ResultRow, TorchRunner

        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
            api = "torchao.quantization.pt2e"
        except ImportError:  # older torch: the same API still in torch.ao
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e  # type: ignore
            from torch.ao.quantization.quantizer.x86_inductor_quantizer import (  # type: ignore
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
            api = "torch.ao.quantization.quantize_pt2e"

        calib = torch.from_numpy(self.calib)
        batch = min(32, len(calib))
        dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        errors = []
        captured, mode = None, None
        for strict in (True, False):
            try:
                with torch.no_grad():
                    captured = torch.export.export(self.module(), (calib[:batch],), dynamic_shapes=dyn,
                                                   strict=strict).module()
                mode = "strict" if strict else "non-strict"
                break
            except Exception as exc:
                errors.append(f"{'strict' if strict else 'non-strict'} export: {first_line(exc)}")
        if captured is None:
            raise RuntimeError("; ".join(errors))
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(captured, quantizer)
        with torch.no_grad():
            for i in range(0, len(calib), batch):
                prepared(calib[i : i + batch])
        converted = convert_pt2e(prepared)
        try:
            from torchao.quantization.pt2e import move_exported_model_to_eval

            move_exported_model_to_eval(converted)
        except ImportError:
            pass
        size = graph_constant_bytes(converted)
        runner = TorchRunner(NoEval(torch.compile(converted), freezing=True), threads=THREADS, name=name)
        t0 = time.perf_counter()
        runner(self.example.numpy())
        return ResultRow(name, "torch.compile", "int8", runner, size, runtime={
            "api": api, "export": mode, "export_errors": errors, "compile_batch1_s": round(time.perf_counter() - t0, 1),
            "size_note": "bytes of the converted graph's tensor constants (int8 weights, scales)"})

    def tflite_int8(self, name: str) -> Any:
        return self.project_int8(name, "tflite")

    def executorch_int8(self, name: str) -> Any:
        return self.project_int8(name, "executorch")

    def project_int8(self, name: str, target_name: str) -> Any:
        """The project's ``target_name`` target with quantization int8 and its defaults."""
        from compressor.evaluate import ResultRow
        from compressor.registry import get_target

        target = get_target(target_name)({"quantization": "int8"})
        engine = target.build(self.artifact, self.work, prefix="peer-", data=self.data)
        return ResultRow(name, target_name, engine.precision, target.load(engine, threads=THREADS),
                         engine.size_bytes, engine=str(engine.path),
                         runtime={"build": {k: engine.info.get(k) for k in ("route", "export", "calibration_samples")}})


class NoEval:
    """Calls a module without exposing .eval() (TorchRunner calls it; exported graphs refuse it).

    ``freezing``: every call runs under ``torch._inductor.config.patch(freezing=True)``, the same as
    TORCHINDUCTOR_FREEZING=1 for this module only, so the compiles (and recompiles at new batch
    sizes) of this module freeze and those of the FP32 torch.compile peer keep Inductor's default.
    (``torch.compile(..., options={"freezing": True})`` is not enough: the int8 patterns then fail
    with UnsupportedOperatorException onednn.qconv_prepack.)"""

    def __init__(self, module: Any, freezing: bool = False) -> None:
        self.module = module
        self.freezing = freezing

    def __call__(self, x: Any) -> Any:
        if not self.freezing:
            return self.module(x)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.module(x)


def graph_constant_bytes(gm: Any) -> int:
    """Bytes of every tensor a GraphModule's graph reads through get_attr (its weights and qparams)."""
    import torch

    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
    return total


# ---------------------------------------------------------------------------------------- ours


def our_subjects(key: str, model: Path, args: argparse.Namespace) -> tuple[list[tuple[Any, Row]], dict, dict]:
    """Run the CLI with each shipped recipe of ``args.recipes``, then load every engine it built, and
    every engine of each finished run of ``args.extra_run`` (TensorRT, not built on a CPU-only
    machine, through its ONNX Runtime proxy)."""
    out: list[tuple[Any, Row]] = []
    failed: dict[str, str] = {}
    cli: dict[str, Any] = {}
    limit = args.cli_eval_limit or args.eval_limit
    for recipe in args.recipes:
        name = f"peers_{key}_{recipe}"
        report_path = HERE / "work" / name / "report.json"
        t0 = time.perf_counter()
        if args.reuse_builds and report_path.exists():
            report = json.loads(report_path.read_text())
            say(f"ours {recipe}: reusing {report_path}")
            report["command"] = "(reused)"
        else:
            extra = ["--eval-limit", str(limit)] if limit else []
            report = run_compress(name, model, recipe, *extra)
        cli[recipe] = run_record(report, report.get("command"), t0, report_path)
        rows, bad = load_engines(report, report_path.parent, recipe, f"shipped recipe {recipe}", {"recipe": recipe})
        out += rows
        failed.update(bad)
    for label, run_dir in args.extra_run:
        report_path = run_dir / "report.json"
        t0 = time.perf_counter()
        report = json.loads(report_path.read_text())
        say(f"ours {label}: the engines of the finished run {run_dir}")
        cli[f"run {label}"] = run_record(report, f"(finished run {run_dir})", t0, report_path)
        rows, bad = load_engines(report, run_dir, label, f"finished run {label} ({run_dir})", {"run": label})
        out += rows
        failed.update(bad)
    return out, failed, cli


def run_record(report: dict, command: str | None, t0: float, report_path: Path) -> dict[str, Any]:
    return {"command": command, "seconds": round(time.perf_counter() - t0, 1),
            "report": str(report_path), "failures": report.get("failures", report.get("not_built")),
            "timings_s": report.get("timings_s"),
            "eval_images": ((report.get("data") or {}).get("evaluation") or {}).get("images")}


def load_engines(report: dict, run_dir: Path, label: str, origin: str, runtime: dict[str, Any]
                 ) -> tuple[list[tuple[Any, Row]], dict[str, str]]:
    """Every engine of one finished run (``run_dir``, its ``report``) as an "ours" row ``ours:LABEL/ENGINE``
    (an engine not built here through its proxy runtime), and the rows that cannot be loaded, with their
    reason. The engines come from compressor.job.engines_of_run, as compress explain and tune load them."""
    from compressor.evaluate import ResultRow
    from compressor.job import engines_of_run

    out: list[tuple[Any, Row]] = []
    failed: dict[str, str] = {}
    cli_top1 = {r["name"]: r["top1"] for r in report.get("results", [])}
    try:
        engines = engines_of_run(run_dir, report)
    except Exception as exc:
        return [], {f"ours:{label}": first_line(exc)}
    for engine, e in zip(engines, report["engines"]):
        row_name = f"ours:{label}/{engine.name}"
        proxy = not engine.built
        try:
            if proxy:
                runtime_name, runner = engine.builder.load_proxy(engine, threads=THREADS)
                row_name += f"-proxy-{runtime_name}"
                cli_name = f"{engine.name}-proxy-{runtime_name}"
            else:
                runner = engine.builder.load(engine, threads=THREADS)
                cli_name = engine.name
        except Exception as exc:
            failed[row_name] = first_line(exc)
            say(f"{row_name}: cannot load: {failed[row_name]}")
            continue
        desc = f"{origin}, engine {engine.name} ({engine.target}, {engine.precision})"
        if proxy:
            desc += f"; not built here ({e['info'].get('not_built', 'no device')}), its graph run on the proxy"
        subject = ResultRow(row_name, engine.target, engine.precision, runner, engine.size_bytes,
                            engine=str(engine.path), runtime={**runtime, **({"proxy": True} if proxy else {})})
        out.append((subject, Row(row_name, "ours", desc, proxy=proxy, cli_top1=cli_top1.get(cli_name))))
    return out, failed


# ---------------------------------------------------------------------------------------- analysis


def dominates(a: dict, b: dict) -> bool:
    """a is at least as accurate and at least as fast as b, and strictly better in one."""
    ta, tb = a["top1"], b["top1"]
    la, lb = a["latency_ms"]["p50"], b["latency_ms"]["p50"]
    return ta >= tb and la <= lb and (ta > tb or la < lb)


def analyse(rows: list[dict]) -> dict:
    """Pareto front (top-1 up, batch-1 p50 down) over every CPU row (proxies left out), our best row
    and the verdict."""
    eligible = [r for r in rows if not r["proxy"]]
    for r in rows:
        r["dominated_by"] = [o["name"] for o in eligible if o is not r and dominates(o, r)] if not r["proxy"] else []
        r["pareto"] = (not r["proxy"]) and not r["dominated_by"]
    source = next(r for r in rows if r["name"] == "peer:pytorch-eager-fp32")
    floor = source["top1"] - TOLERANCE
    ours = [r for r in eligible if r["kind"] == "ours"]
    within = [r for r in ours if r["top1"] >= floor]
    best = min(within, key=lambda r: (r["latency_ms"]["p50"], -r["top1"])) if within else None
    dominating = [n for n in best["dominated_by"] if n.startswith("peer:")] if best else []
    return {
        "definition": (f"our best = the fastest (lowest batch-1 p50) of our CPU rows whose top-1 is at least the "
                       f"FP32 source's top-1 (peer:pytorch-eager-fp32, {source['top1']:.2f}%) minus {TOLERANCE:g} "
                       "point; a row dominates another when its top-1 is >= and its p50 <=, one of them strictly; "
                       "the Pareto front is the rows no other row dominates (TensorRT proxy rows left out: they "
                       "are not a CPU deployment)"),
        "source_top1": source["top1"],
        "top1_floor": floor,
        "best_ours": best["name"] if best else None,
        "best_ours_on_front": bool(best and best["pareto"]),
        "dominating_peers": dominating,
        "no_peer_dominates_our_best": bool(best) and not dominating,
        "peers_on_front": [r["name"] for r in eligible if r["kind"] == "peer" and r["pareto"]],
        "ours_on_front": [r["name"] for r in ours if r["pareto"]],
    }


def head_to_head(best: dict, rows: list[dict], extras: dict[str, tuple[np.ndarray, list[float]]],
                 labels: np.ndarray) -> list[dict]:
    """Our best against every peer: the top-1 difference with an exact McNemar p-value on the paired
    per-image correctness, and the peer's p50 over ours with a 95% percentile-bootstrap interval
    (both from compressor.compare), so a verdict decided inside the noise can be seen as such."""
    from compressor.compare import bootstrap_median_ratio, mcnemar_exact

    ours_pred, ours_lat = extras[best["name"]]
    out = []
    for r in rows:
        if r["kind"] != "peer":
            continue
        pred, lat = extras[r["name"]]
        entry: dict[str, Any] = {"peer": r["name"], "top1_diff": r["top1"] - best["top1"]}
        try:
            p, lost, gained = mcnemar_exact(ours_pred == labels, pred == labels)
            entry.update(mcnemar_p=p, peer_right_ours_wrong=gained, ours_right_peer_wrong=lost)
        except ImportError:  # scipy missing: no p-value
            pass
        ratio, lo, hi, p = bootstrap_median_ratio(np.asarray(ours_lat), np.asarray(lat), resamples=2000, seed=0,
                                                  level=0.95)
        entry.update(p50_ratio=ratio, p50_ratio_ci95=[lo, hi], p50_ratio_p=p,
                     dominates=r["name"] in best["dominated_by"])
        if entry["dominates"]:
            entry["within_noise"] = hi >= 1.0 or entry.get("mcnemar_p", 0.0) >= 0.05
        out.append(entry)
    return sorted(out, key=lambda e: e["p50_ratio"])


# ---------------------------------------------------------------------------------------- output


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def write_markdown(path: Path, rep: dict) -> None:
    a = rep["analysis"]
    rows = sorted(rep["rows"], key=lambda r: r["latency_ms"]["p50"])
    env = rep["environment"]
    lines = [
        f"# Peer benchmark: {rep['model_key']} ({Path(rep['model']).name})",
        "",
        f"{rep['eval_images']} CIFAR-10 test images{' (class-balanced subset: smoke run)' if rep['eval_limit'] else ''}; "
        f"calibration: {CAL['samples']} class-balanced training images (seed {CAL['seed']}) for every INT8 row; "
        f"{THREADS} threads for every runtime; CPU: {env.get('cpu')} ({', '.join(env.get('isa_flags') or []) or 'no listed ISA flags'}); "
        f"all rows measured in one session, batch-1 latency timed in {rep['evaluation']['latency_rounds']} rounds "
        "interleaved over every row. Created " + rep["created"] + ".",
        "",
        f"**No peer dominates our best: {'yes' if a['no_peer_dominates_our_best'] else 'NO'}.** "
        + (f"Our best: `{a['best_ours']}`" if a["best_ours"] else
           f"Our best: none (no row of ours within {TOLERANCE:g} point of the source)")
        + (f" (top-1 {rep['by_name'][a['best_ours']]['top1']:.2f}%, p50 "
           f"{rep['by_name'][a['best_ours']]['latency_ms']['p50']:.3f} ms), "
           f"{'on' if a['best_ours_on_front'] else 'NOT on'} the Pareto front." if a["best_ours"] else ".")
        + (f" Dominated by: {', '.join('`' + n + '`' for n in a['dominating_peers'])}." if a["dominating_peers"] else ""),
        "",
        f"Definition: {a['definition']}.",
        "",
        "| row | precision | top-1 % | top-5 % | agree % | p50 ms | p90 ms | img/s (batch "
        f"{rep['evaluation']['throughput_batch']}) | size MB | front | dominated by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|---|",
    ]
    for r in rows:
        mark = "**front**" if r["pareto"] else ("proxy" if r["proxy"] else "")
        name = f"**{r['name']}**" if r["name"] == a["best_ours"] else r["name"]
        dom = ", ".join(r["dominated_by"][:3]) + (f" (+{len(r['dominated_by']) - 3})" if len(r["dominated_by"]) > 3 else "")
        lines.append(
            f"| {name} | {r['precision']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['agreement']:.2f} | "
            f"{r['latency_ms']['p50']:.3f} | {r['latency_ms']['p90']:.3f} | {r['throughput_ips']:.1f} | "
            f"{mb(r['size_bytes'])} | {mark} | {dom} |")
    if rep.get("head_to_head"):
        lines += ["", f"Our best against each peer (peer p50 / our p50 with its 95% bootstrap interval over the "
                  "latency samples; top-1 difference with the exact McNemar p-value on the paired per-image "
                  "results; a ratio interval that contains 1 or p >= 0.05 is within the measurement noise):", "",
                  "| peer | top-1 diff (pt) | McNemar p | p50 ratio | 95% interval | dominates our best |",
                  "|---|---:|---:|---:|---|---|"]
        for e in rep["head_to_head"]:
            mp = f"{e['mcnemar_p']:.3f}" if "mcnemar_p" in e else "-"
            lo, hi = e["p50_ratio_ci95"]
            dom = ("yes (within noise)" if e.get("within_noise") else "yes") if e["dominates"] else "no"
            lines.append(f"| {e['peer']} | {e['top1_diff']:+.2f} | {mp} | {e['p50_ratio']:.3f} | "
                         f"{lo:.3f}-{hi:.3f} | {dom} |")
    lines += ["", f"Pareto plot: `pareto_{rep['model_key']}.png`. Agreement is with peer:pytorch-eager-fp32 "
              "(the source). Sizes are the engine files (torch rows: the source file; PT2E: its int8 tensor constants).",
              ""]
    if rep["failed"]:
        lines += ["## Failed", "", "| row | reason |", "|---|---|"]
        lines += [f"| {n} | {reason.replace('|', '/')} |" for n, reason in rep["failed"].items()]
        lines.append("")
    lines += ["## What each peer does", ""]
    lines += [f"- `peer:{n}`: {d}" for n, d in PEERS.items()]
    extra = rep.get("extra_runs") or {}
    origin = " and ".join(([] if rep.get("recipes") == [] else ["built by `compress` with the shipped recipes"])
                          + (["of the finished runs " + ", ".join(f"{k} (`{v}`)" for k, v in extra.items())]
                             if extra else []))
    lines += ["", "## Our rows", "",
              f"Engines {origin} (commands below) and loaded again here with the project's runners; `cli top-1` "
              "is what the CLI's own report measured for the same engine." if origin else
              "No rows of ours: no recipe (--recipes none) and no finished run (--extra-run).", "",
              "| row | cli top-1 % | here top-1 % |", "|---|---:|---:|"]
    for r in rep["rows"]:
        if r["kind"] == "ours":
            cli = f"{r['cli_top1']:.2f}" if r.get("cli_top1") is not None else "-"
            lines.append(f"| {r['name']} | {cli} | {r['top1']:.2f} |")
    lines += [""]
    for recipe, c in rep["cli_runs"].items():
        lines.append(f"- {recipe}: `{c['command']}` ({c['seconds']} s)")
    lines += ["", "## Time", "", f"Peers built in {rep['timings_s']['peers']} s, our engines in "
              f"{rep['timings_s']['ours']} s, measurement {rep['timings_s']['measure']} s, total "
              f"{rep['timings_s']['total']} s.", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()), ""]
    write_text(path, "\n".join(lines))


def plot(path: Path, rep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 6.5))
    a = rep["analysis"]
    ours_label = "ours (shipped recipes)" if not rep.get("extra_runs") else "ours"
    styles = {"ours": dict(marker="o", color="tab:blue", label=ours_label),
              "peer": dict(marker="^", color="tab:orange", label="peers (library defaults)")}
    for kind, st in styles.items():
        pts = [r for r in rep["rows"] if r["kind"] == kind and not r["proxy"]]
        ax.scatter([r["latency_ms"]["p50"] for r in pts], [r["top1"] for r in pts], s=60, zorder=3,
                   edgecolors="black", linewidths=0.5, **st)
    prox = [r for r in rep["rows"] if r["proxy"]]
    if prox:
        ax.scatter([r["latency_ms"]["p50"] for r in prox], [r["top1"] for r in prox], marker="x", color="grey",
                   s=50, zorder=3, label="ours, TensorRT graph on ORT (proxy, off the front)")
    front = sorted((r for r in rep["rows"] if r["pareto"]), key=lambda r: r["latency_ms"]["p50"])
    if front:
        xs, ys = [], []
        for r in front:  # staircase: each front point holds its top-1 until the next, slower, better one
            if xs:
                xs.append(r["latency_ms"]["p50"])
                ys.append(ys[-1])
            xs.append(r["latency_ms"]["p50"])
            ys.append(r["top1"])
        ax.plot(xs, ys, "-", color="tab:green", lw=1.5, zorder=2, label="Pareto front")
    for r in rep["rows"]:
        r["best"] = r["name"] == a["best_ours"]
    if a["best_ours"]:
        b = rep["by_name"][a["best_ours"]]
        ax.scatter([b["latency_ms"]["p50"]], [b["top1"]], marker="*", s=400, facecolors="none",
                   edgecolors="tab:red", linewidths=1.5, zorder=4, label="our best")
    ax.axhline(a["top1_floor"], color="grey", ls=":", lw=1, label=f"source top-1 - {TOLERANCE:g} pt")
    ax.set_xscale("log")
    ax.set_xlabel(f"batch-1 latency p50 (ms, log scale, {THREADS} threads)")
    ax.set_ylabel(f"top-1 % ({rep['eval_images']} CIFAR-10 test images)")
    ax.set_title(f"{rep['model_key']}: top-1 vs batch-1 latency, ours (circles) vs peers (triangles)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ys = [r["top1"] for r in rep["rows"]]
    pad = max(0.3, 0.06 * (max(ys) - min(ys)))
    ax.set_ylim(min(min(ys), a["top1_floor"]) - pad, max(ys) + pad)
    fig.subplots_adjust(left=0.06, right=0.64, top=0.93, bottom=0.09)
    place_labels(ax, rep["rows"])
    fig.savefig(path, dpi=130)
    plt.close(fig)


def short(name: str) -> str:
    return name.replace("cpu_targets_side_by_side/", "side_by_side/").replace("-proxy-onnxruntime", " (proxy)")


def place_labels(ax: Any, rows: list[dict]) -> None:
    """Number every point (in order of latency) and list the numbers beside the plot; each number
    goes at the first of a few offsets where its box overlaps no number placed before."""
    fig = ax.figure
    xs = [r["latency_ms"]["p50"] for r in rows]
    ax.set_xlim(min(xs) / 1.4, max(xs) * 1.6)
    renderer = fig.canvas.get_renderer()
    candidates = [(dx, dy) for dy in (2, -9, 9, -15, 15) for dx in (5, -11, 12, -18)]
    ordered = sorted(rows, key=lambda r: r["latency_ms"]["p50"])
    from matplotlib.transforms import Bbox

    placed: list[Any] = []
    for r in rows:  # the markers themselves (the star of our best is larger)
        px, py = ax.transData.transform((r["latency_ms"]["p50"], r["top1"]))
        half = 14 if r.get("best") else 6
        placed.append(Bbox.from_extents(px - half, py - half, px + half, py + half))
    for number, r in enumerate(ordered, 1):
        pos = (r["latency_ms"]["p50"], r["top1"])
        style = dict(textcoords="offset points", fontsize=7, fontweight="bold" if r.get("pareto") else "normal")
        text = None
        for dx, dy in candidates:
            text = ax.annotate(str(number), pos, xytext=(dx, dy), **style)
            if not any(text.get_window_extent(renderer).overlaps(b) for b in placed):
                break
            text.remove()
            text = None
        if text is None:
            text = ax.annotate(str(number), pos, xytext=candidates[0], **style)
        placed.append(text.get_window_extent(renderer))
    key = "\n".join(f"{n:>2}  {short(r['name'])}{'  (front)' if r.get('pareto') else ''}"
                     for n, r in enumerate(ordered, 1))
    ax.text(1.02, 0.70, key, transform=ax.transAxes, fontsize=7, va="top", ha="left", family="monospace")


# ---------------------------------------------------------------------------------------- main


def run_model(key: str, args: argparse.Namespace) -> dict:
    from compressor.data import DataConfig, open_data, preprocess
    from compressor.environment import environment
    from compressor.evaluate import EvaluationConfig, measure_all
    from compressor.intake import load_model

    started = time.perf_counter()
    model_path = SHARED / "models" / MODELS[key]
    say(f"=== {key}: {model_path}")

    t0 = time.perf_counter()
    ours, failed_ours, cli = our_subjects(key, model_path, args)
    t_ours = time.perf_counter() - t0

    artifact = load_model(model_path, trust=True)
    data = open_data(DataConfig(source="cifar10", root=str(SHARED / "datasets" / "cifar10"), calibration=CAL,
                                evaluation={"split": "test", "limit": args.eval_limit}))
    size = tuple(artifact.input_spec.sample_shape[1:])
    images, labels = data.evaluation_set(size, artifact.preprocessing)
    x = preprocess(images, artifact.preprocessing)
    calib = preprocess(data.calibration_images(size, artifact.preprocessing), artifact.preprocessing)

    out_name = args.out_name.format(model=key)
    work = HERE / "work" / out_name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    builder = PeerBuilder(artifact, data, calib, work)
    peers = builder.build_all()
    t_peers = time.perf_counter() - t0
    failed = {f"peer:{n}": r for n, r in builder.failed.items()}
    failed.update(failed_ours)

    if args.eval_limit:  # a smoke run: shorter timing
        cfg = EvaluationConfig(threads=THREADS, warmup=10, latency_runs=60, latency_min_seconds=0.5,
                               latency_rounds=4, throughput_seconds=1.0)
    else:
        cfg = EvaluationConfig(threads=THREADS)
    pairs = peers + ours
    meta = {s.name: row for s, row in pairs}

    def on_error(subject: Any, exc: Exception) -> None:
        failed[subject.name] = f"failed on its runtime: {first_line(exc)}"
        say(f"{subject.name}: FAILED at run time: {failed[subject.name]}")

    say(f"measuring {len(pairs)} rows on {len(x)} images")
    t0 = time.perf_counter()
    measured = measure_all([s for s, _ in pairs], x=x, labels=labels, cfg=cfg, threads=THREADS, progress=say,
                           on_error=on_error)
    t_measure = time.perf_counter() - t0

    rows = []
    for m in measured:
        r = m.to_json()
        row = meta[m.name]
        r.update(kind=row.kind, description=row.description, proxy=row.proxy, build_s=row.build_s,
                 cli_top1=row.cli_top1)
        rows.append(r)
    rep: dict[str, Any] = {
        "issue": 5,
        "model_key": key,
        "model": str(model_path),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "eval_limit": args.eval_limit,
        "eval_images": int(len(x)),
        "calibration": CAL,
        "threads": THREADS,
        "evaluation": cfg.model_dump(),
        "environment": environment(THREADS),
        "peers": PEERS,
        "rows": rows,
        "failed": failed,
        "cli_runs": cli,
        "recipes": list(args.recipes),
        "extra_runs": {label: str(d) for label, d in args.extra_run},
    }
    rep["by_name"] = {r["name"]: r for r in rows}
    rep["analysis"] = analyse(rows)
    best = rep["analysis"]["best_ours"]
    if best:
        extras = {m.name: (m.predictions, m.latency_samples_ms) for m in measured}
        rep["head_to_head"] = head_to_head(rep["by_name"][best], rows, extras, labels)
    rep["timings_s"] = {"ours": round(t_ours, 1), "peers": round(t_peers, 1), "measure": round(t_measure, 1),
                        "total": round(time.perf_counter() - started, 1)}

    dest = HERE / "results" / out_name
    dest.mkdir(parents=True, exist_ok=True)
    plot(dest / f"pareto_{key}.png", rep)
    by_name = rep.pop("by_name")
    write_text(dest / "report.json", json.dumps(rep, indent=1, default=str) + "\n")
    rep["by_name"] = by_name
    write_markdown(dest / "report.md", rep)
    a = rep["analysis"]
    say(f"wrote {dest}/report.md")
    for r in sorted(rows, key=lambda r: r["latency_ms"]["p50"]):
        say(f"  {r['name']:<62} top1 {r['top1']:6.2f}  p50 {r['latency_ms']['p50']:8.3f} ms"
            f"{'  front' if r['pareto'] else ''}")
    for n, reason in failed.items():
        say(f"  FAILED {n}: {reason}")
    say(f"  our best: {a['best_ours']}; no peer dominates it: {'yes' if a['no_peer_dominates_our_best'] else 'NO'}"
        + (f" (dominated by {', '.join(a['dominating_peers'])})" if a["dominating_peers"] else ""))
    return rep


def main() -> int:
    require_modules(*NEEDS)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"models ({', '.join(MODELS)}; default: both)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="class-balanced subset of the test split (smoke runs; also shortens the timing)")
    p.add_argument("--cli-eval-limit", type=int, default=None,
                   help="--eval-limit for the CLI runs that build our engines (default: --eval-limit); the CLI's "
                        "own measurement is only a cross-check, every reported figure is measured here")
    p.add_argument("--reuse-builds", action="store_true",
                   help="reuse benchmarks/work/peers_<model>_<recipe> from an earlier run instead of running the CLI")
    p.add_argument("--recipes", default=",".join(RECIPES), metavar="NAMES",
                   help=f"comma-separated shipped recipes for our rows, or 'none' (default: {','.join(RECIPES)})")
    p.add_argument("--extra-run", action="append", default=[], metavar="LABEL=DIR",
                   help="a finished run directory (report.json, engines/) whose engines are added as rows "
                        "ours:LABEL/ENGINE; repeatable; one model only")
    p.add_argument("--out-name", default="peers_{model}", metavar="NAME",
                   help="write to benchmarks/results/NAME ('{model}' is replaced by the model; default: %(default)s)")
    args = p.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    shipped = sorted(f.stem for f in (REPO / "recipes").glob("*.yaml"))
    names = [] if args.recipes.strip() == "none" else args.recipes.split(",")
    args.recipes = tuple(r.strip() for r in names if r.strip())
    if any(r not in shipped for r in args.recipes):
        p.error(f"unknown recipe {next(r for r in args.recipes if r not in shipped)!r} (shipped: {', '.join(shipped)})")
    runs = []
    for spec in args.extra_run:
        label, _, folder = spec.partition("=")
        run_dir = Path(folder)
        if not label or not folder or "/" in label or label in args.recipes or label in dict(runs):
            p.error(f"--extra-run {spec!r}: want LABEL=DIR with a new label without '/' (not a recipe's name)")
        if not (run_dir / "report.json").is_file() or not (run_dir / "engines").is_dir():
            p.error(f"--extra-run {spec!r}: {run_dir} is not a finished run (report.json and engines/)")
        runs.append((label, run_dir))
    args.extra_run = runs
    several = len(args.models or MODELS) > 1
    if several and runs:
        p.error("--extra-run: the engines of a run are for one model; name that one model")
    if several and "{model}" not in args.out_name:
        p.error("--out-name: with several models, NAME needs '{model}'")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    verdicts = {}
    for key in args.models or list(MODELS):
        rep = run_model(key, args)
        verdicts[key] = rep["analysis"]["no_peer_dominates_our_best"]
    for key, ok in verdicts.items():
        print(f"{key}: no peer dominates our best: {'yes' if ok else 'NO'}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
