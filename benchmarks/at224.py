"""Issue 23, part 3: 224x224 figures and the floor.

ResNet-50 and MobileNetV2 (../shared/models, trained on CIFAR-10 at 32x32) are compiled at 224x224
(recipe ``model: {input_shape: [1, 3, 224, 224]}``; CIFAR-10 test images upscaled by the tool's own
data path) by the ``compress`` CLI into every CPU engine: OpenVINO FP32 and INT8 (NNCF), ONNX Runtime
FP32 and INT8 QDQ, TFLite FP32 and INT8 (XNNPACK). The CLI's report gives each engine's agreement
with the source on ``--images`` test images (top-1 means nothing here: the models never saw 224x224
images). Then, in this process, one timing session: every engine and eager PyTorch FP32, at batch 1
and batch 16, a byte-identical copy of the OpenVINO INT8 engine (the copy check), and the peak
microbenchmarks (large FP32 and INT8 convolutions and a memory read, compiled by OpenVINO's CPU
plugin, oneDNN) are timed by compressor.evaluate.latency (warm blocks, rounds shuffled every other
round and mirrored in the next, the calling thread pinned): a batch-16 entry is the same engine
handed a fixed batch of 16 images, so both batch sizes go through the same blocks and rounds.

Figures: p50 per engine and batch; each model's MACs (convolutions and linear layers, counted by
torch.utils.flop_counter at 224; the tool's pruning counter, torch_pruning, alongside); the peak
INT8 and FP32 MAC rates (the best of five convolution shapes, batch 1 and 16; the kernel OpenVINO ran and its
runtime precision are recorded, so an "INT8" peak that ran in FP32 shows); efficiency =
(MACs x batch / peak of the engine's precision) / p50; OpenVINO's per-layer performance counters
(PERF_COUNT) and ONNX Runtime's profiler per engine, batch 1 and 16, to say where the time above
the floor goes (convolutions against their compute and memory floors, layout reorders, other
operators, quantize/dequantize left unfused, time outside the operators).

Goals (issue 23): the best INT8 engine at >= 6x eager FP32 and >= 50 % of the INT8 peak for
ResNet-50 at batch 16; the copies of one engine within 3 % of each other.

    python benchmarks/at224.py                 # the full run: both models, 500 images (run it alone)
    python benchmarks/at224.py --quick         # smoke: MobileNetV2, 32 images, 2 rounds; writes under
                                               # benchmarks/work/at224/quick/, never benchmarks/results/
    python benchmarks/at224.py --reuse         # time the engines a previous run left in benchmarks/work/at224/

Writes benchmarks/results/at224/report.json and report.md (--out to change); engines, recipes and
profiles under benchmarks/work/at224/ (gitignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, SHARED, require_modules, run_compress, write_text  # noqa: E402

require_modules("openvino", "onnxruntime", "nncf", "litert_torch", "ai_edge_litert", "torchao", "torch_pruning")

from compressor.target_base import Runner  # noqa: E402

MODELS = {"resnet50": "resnet50_cifar10.pt", "mobilenetv2": "mobilenet_v2_cifar10.pt"}
SIZE = 224
BATCHES = (1, 16)
# (engine name in the CLI run, label, precision); "source" is the model itself in eager PyTorch
ENGINES = [
    ("source", "PyTorch eager FP32", "fp32"),
    ("openvino-fp32", "OpenVINO FP32", "fp32"),
    ("nncf-openvino-int8", "OpenVINO INT8 (NNCF)", "int8"),
    ("onnxruntime-fp32", "ONNX Runtime FP32", "fp32"),
    ("ortq-onnxruntime-int8", "ONNX Runtime INT8 QDQ", "int8"),
    ("tflite-fp32", "TFLite FP32 (XNNPACK)", "fp32"),
    ("tflite-int8", "TFLite INT8 (XNNPACK)", "int8"),
]
CLI_FIELDS = ("top1", "agreement", "output_sqnr_db", "size_bytes", "precision", "target")  # kept per CLI row
COPIED = "nncf-openvino-int8"  # the INT8 engine timed twice (a byte-identical copy) in the session
GOAL_SPEEDUP, GOAL_PEAK_SHARE, GOAL_COPY_GAP = 6.0, 0.50, 0.03
# compute-bound shapes for the peak: (name, batch, in channels, out channels, height = width, kernel)
# (batch 16 too: on AMX the batch-1 shapes left the tiles idle, and ResNet-50 at batch 16 ran at 139 % of their rate)
PEAK_CONVS = [("conv 3x3 256->256 @56x56", 1, 256, 256, 56, 3), ("conv 3x3 512->512 @28x28", 1, 512, 512, 28, 3),
              ("conv 1x1 1024->1024 @28x28", 1, 1024, 1024, 28, 1),
              ("conv 3x3 256->256 @28x28 x16", 16, 256, 256, 28, 3), ("conv 1x1 1024->1024 @14x14 x16", 16, 1024, 1024, 14, 1)]
BANDWIDTH_FLOATS = 64 << 20  # 256 MB read by an OpenVINO ReduceSum: far beyond any cache
CONV_TYPES = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")

# The build's recipe is the shipped recipes/cpu_targets_side_by_side.yaml at 224x224 without its TensorRT
# branch (not a CPU engine), with no download; its own timing is cut to a token: the figures come from
# this script's session, where every engine and both batch sizes are timed together.
SHIPPED_RECIPE = "cpu_targets_side_by_side"
TOKEN_TIMING = {"batch_size": 16, "warmup": 1, "latency_runs": 10, "latency_rounds": 1, "latency_min_seconds": 0,
                "latency_warm_ms": 0, "paced_rate_hz": None, "throughput_batch": 16, "throughput_seconds": 0.1}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel(path: Path | str) -> str:
    """``path`` as seen from where the command ran."""
    return os.path.relpath(Path(path).resolve(), Path.cwd())


# ----------------------------------------------------------------------------------- session entries


class FixedInput(Runner):
    """``inner`` run on its own fixed input whatever it is handed: evaluate.latency calls every runner
    with one batch-1 sample; through this, an entry times a batch of 16, or a microbenchmark its own
    tensor, in the same blocks and rounds as everything else. ``inner`` is shared and closed by its owner."""

    def __init__(self, inner: Runner, x: np.ndarray) -> None:
        self.inner = inner
        self.x = np.ascontiguousarray(x)
        self.name = getattr(inner, "name", "")

    def prepare(self, batch: int) -> None:
        self.inner.prepare(len(self.x))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.inner(self.x)

    def runtime_info(self) -> dict[str, Any]:
        return self.inner.runtime_info()


@dataclass
class Entry:
    """One row of the timing session."""

    group: str  # a model key, or "peak"
    name: str  # engine name in the run, or the microbenchmark's
    label: str
    precision: str
    batch: int
    runner: FixedInput
    macs: float  # multiply-accumulates of one call
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ models


def count_macs(module: Any) -> dict[str, float]:
    """MACs of one 224x224 image: convolutions and linear layers by torch.utils.flop_counter (FLOPs / 2),
    and the tool's pruning counter (torch_pruning, which also counts batch norm, activations, pooling)."""
    import copy

    import torch
    import torch_pruning as tp
    from torch.utils.flop_counter import FlopCounterMode

    module = copy.deepcopy(module).eval()
    x = torch.zeros(1, 3, SIZE, SIZE)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    by_op = {str(k): v / 2 for k, v in counter.get_flop_counts()["Global"].items()}
    tp_macs, params = tp.utils.count_ops_and_params(module, x)
    return {"macs": counter.get_total_flops() / 2, "by_op": by_op, "torch_pruning_macs": float(tp_macs),
            "params": float(params)}


def at224_recipe(key: str, calibration: int) -> str:
    """The shipped side-by-side recipe at 224x224, CPU targets only (YAML text)."""
    import yaml

    from compressor.recipe import SHIPPED_RECIPES

    recipe = yaml.safe_load((SHIPPED_RECIPES / f"{SHIPPED_RECIPE}.yaml").read_text())
    recipe["name"] = f"at224_{key}"
    recipe["description"] = f"{SHIPPED_RECIPE} at {SIZE}x{SIZE}, CPU targets only (benchmarks/at224.py)"
    recipe["model"] = {**recipe.get("model", {}), "input_shape": [1, 3, SIZE, SIZE]}
    recipe["data"] = {**recipe["data"], "download": False,
                      "calibration": {**recipe["data"].get("calibration", {}), "samples": calibration}}
    recipe["branches"] = [b for b in recipe.get("branches", [])
                          if not any("tensorrt" in (t if isinstance(t, str) else t) for t in b["targets"])]
    recipe["evaluation"] = TOKEN_TIMING
    recipe.pop("acceptance", None)  # top-1 on upscaled 32x32 images judges nothing
    return "# written by benchmarks/at224.py (issue 23, part 3)\n" + yaml.safe_dump(recipe, sort_keys=False)


def build(key: str, args: argparse.Namespace) -> tuple[dict, Path, float]:
    """The CLI run of one model at 224: (its report, its directory, seconds); reused with --reuse."""
    name = f"at224/{key}"
    work = HERE / "work" / name
    if args.reuse and (work / "report.json").is_file():
        say(f"{key}: reusing the engines of {rel(work)}")
        return json.loads((work / "report.json").read_text()), work, 0.0
    recipe = HERE / "work" / "at224" / f"recipe-{key}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(at224_recipe(key, args.calibration))
    t0 = time.perf_counter()
    report = run_compress(name, SHARED / "models" / MODELS[key], str(recipe), "--eval-limit", str(args.images),
                          "--threads", str(args.threads))
    report["command"] = report["command"].replace(str(recipe), rel(recipe))
    return report, work, time.perf_counter() - t0


def timing_images(art: Any, count: int) -> np.ndarray:
    """``count`` test images at 224 as the tool feeds them (its data path, the model's preprocessing)."""
    from compressor.data import DataConfig, open_data, preprocess

    data = open_data(DataConfig(source="cifar10", root=str(SHARED / "datasets" / "cifar10"), download=False,
                                evaluation={"limit": count}))
    images, _ = data.evaluation_set((SIZE, SIZE), art.preprocessing)
    return np.ascontiguousarray(preprocess(images, art.preprocessing), dtype=np.float32)


def model_entries(key: str, report: dict, work: Path, args: argparse.Namespace, owned: list[Runner]
                  ) -> tuple[list[Entry], dict[str, Any]]:
    """Session entries of one model (every engine and eager FP32 at each batch size, plus the copy)."""
    from compressor.evaluate import TorchRunner
    from compressor.intake import load_model
    from compressor.job import engines_of_run

    art = load_model(SHARED / "models" / MODELS[key], trust=True, input_shape=[1, 3, SIZE, SIZE])
    macs = count_macs(art.torch_module())
    x = timing_images(art, max(BATCHES))
    engines = {e.name: e for e in engines_of_run(work, report)}
    runners: dict[str, tuple[Runner, str, str, dict[str, Any]]] = {}
    source = TorchRunner(art.torch_module(), threads=args.threads, name="eager")
    runners["source"] = (source, "PyTorch eager FP32", "fp32", {"engine_file": None})
    missing = []
    for name, label, precision in ENGINES[1:]:
        e = engines.get(name)
        if e is None or not e.built:
            missing.append(name)
            continue
        runners[name] = (e.builder.load(e, threads=args.threads), label, precision,
                         {"engine_file": rel(e.path), "size_bytes": e.size_bytes})
        if name == COPIED:
            copy_dir = HERE / "work" / "at224" / "copies" / key / name
            shutil.rmtree(copy_dir, ignore_errors=True)
            copy_dir.mkdir(parents=True)
            files = []
            for f in e.files:
                shutil.copyfile(f, copy_dir / Path(f).name)
                files.append(copy_dir / Path(f).name)
            twin = type(e)(e.target, name + "-copy", files, e.precision, e.info, built=e.built, builder=e.builder)
            runners[name + " (copy)"] = (e.builder.load(twin, threads=args.threads), label + " (copy)", precision,
                                         {"engine_file": rel(twin.path), "copy_of": name})
    entries = []
    for name, (runner, label, precision, extra) in runners.items():
        owned.append(runner)
        for b in BATCHES:
            entries.append(Entry(key, name, label, precision, b, FixedInput(runner, x[:b]), macs["macs"] * b,
                                 dict(extra)))
    return entries, {"macs": macs, "missing_engines": missing, "images_timed": int(len(x))}


# ----------------------------------------------------------------------------------------- the peak


def peak_models(args: argparse.Namespace) -> list[tuple[str, str, Path, np.ndarray, float]]:
    """OpenVINO IR files of the microbenchmarks, built with openvino's opset API: each PEAK_CONVS shape
    in FP32, and in INT8 as NNCF writes it (u8 FakeQuantize on the activations, i8 weights with a
    per-channel dequantizing Multiply, a FakeQuantize on the output), so the CPU plugin's low-precision
    transformations run it as an INT8 convolution; and a ReduceSum over 256 MB (memory read bandwidth).
    (name, precision, xml, input, MACs or bytes)."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino import Type

    rng = np.random.default_rng(0)
    root = HERE / "work" / "at224" / "peak"

    def fq(node: Any, lo: float, hi: float) -> Any:
        a, b = ops.constant(np.float32(lo)), ops.constant(np.float32(hi))
        return ops.fake_quantize(node, a, b, a, b, 256)

    out = []
    for name, n, cin, cout, hw, k in PEAK_CONVS[: (1 if args.quick else None)]:
        w = (rng.standard_normal((cout, cin, k, k)) * 0.05).astype(np.float32)
        scale = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32).reshape(cout, 1, 1, 1)
        wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        x = rng.uniform(0, 4, (n, cin, hw, hw)).astype(np.float32)
        macs = float(n * cout * hw * hw * cin * k * k)
        pads = [k // 2] * 2
        for precision in ("fp32", "int8"):
            p = ops.parameter([n, cin, hw, hw], Type.f32, name="x")
            if precision == "int8":
                weights = ops.multiply(ops.convert(ops.constant(wq), Type.f32), ops.constant(scale))
                y = fq(ops.convolution(fq(p, 0.0, 4.0), weights, [1, 1], pads, pads, [1, 1]), -8.0, 8.0)
            else:
                y = ops.convolution(p, ops.constant(w), [1, 1], pads, pads, [1, 1])
            xml = root / f"{precision}-{name.replace(' ', '_').replace('>', '').replace('@', '')}" / "model.xml"
            xml.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(ov.Model([ops.result(y)], [p], name), str(xml), compress_to_fp16=False)
            out.append((name, precision, xml, x, macs))
    floats = BANDWIDTH_FLOATS // (8 if args.quick else 1)
    p = ops.parameter([floats // 1024, 1024], Type.f32, name="x")
    xml = root / "bandwidth" / "model.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([ops.result(ops.reduce_sum(p, ops.constant(np.array([0, 1], np.int64)), False))], [p]),
                  str(xml), compress_to_fp16=False)
    out.append((f"memory read: ReduceSum over {floats * 4 / 1e6:.0f} MB", "bandwidth", xml,
                np.ones((floats // 1024, 1024), np.float32), float(floats * 4)))
    return out


def peak_entries(args: argparse.Namespace, owned: list[Runner]) -> list[Entry]:
    from compressor.targets.openvino import OVRunner

    entries = []
    for name, precision, xml, x, amount in peak_models(args):
        runner = OVRunner(xml, threads=args.threads)
        owned.append(runner)
        label = name if precision == "bandwidth" else f"{name} {precision.upper()}"
        entries.append(Entry("peak", name, label, precision, 1, FixedInput(runner, x), amount,
                             {"xml": rel(xml)}))
    return entries


# ------------------------------------------------------------------------------------------ session


def time_session(entries: list[Entry], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every entry in one evaluate.latency session; the load of the machine around it (machine_load.py)."""
    from compressor.evaluate import EvaluationConfig, latency, latency_stats, timing_method
    from compressor.machine_load import LoadMonitor

    cfg = EvaluationConfig(threads=args.threads, warmup=args.warmup, latency_runs=args.runs,
                           latency_rounds=args.rounds, latency_min_seconds=args.min_seconds, paced_rate_hz=None)
    monitor = LoadMonitor()
    monitor.before()
    t0 = time.perf_counter()
    samples = latency([e.runner for e in entries], np.zeros((1, 1), np.float32), cfg, progress=say)
    seconds = time.perf_counter() - t0
    monitor.during()
    for e, s in zip(entries, samples):
        e.extra["latency_ms"] = latency_stats(s)
        try:
            e.extra["runtime"] = e.runner.runtime_info()
        except Exception as exc:  # a runtime's self-description must not lose the figures
            e.extra["runtime"] = {"error": f"{type(exc).__name__}: {exc}"}
    method = {**timing_method(cfg), "seconds": round(seconds, 1),
              "config": {k: v for k, v in cfg.model_dump().items() if k.startswith(("latency", "warmup", "threads"))}}
    return method, monitor.summary()


# ----------------------------------------------------------------------------------------- profiles


def is_conv(kind: str) -> bool:
    """An OpenVINO layer type that multiplies by weights (FullyConnectedQuantizedLegacy too)."""
    return kind.startswith(CONV_TYPES)


def _numel(shape: Any) -> int:
    return int(np.prod([int(d.get_length()) if hasattr(d, "get_length") else int(d) for d in shape]))


def ov_profile(xml: Path, x: np.ndarray, runs: int, peaks: dict[str, float], bandwidth: float,
               threads: int) -> dict[str, Any]:
    """OpenVINO's per-layer performance counters (PERF_COUNT) of the engine at ``len(x)``, compiled as the
    project's OVRunner compiles it: per layer its mean time over ``runs`` calls, kernel and runtime precision,
    and for convolutions their MACs, their compute floor (MACs / peak of their precision) and memory floor
    (bytes of inputs, weights and output / read bandwidth)."""
    from compressor.targets.openvino import OVRunner

    runner = OVRunner(xml, threads=threads)
    runner.core.set_property("CPU", {"PERF_COUNT": True})
    batch = len(x)
    runner.prepare(batch)
    request = runner._requests[batch]  # the runner's own compiled model and request, profiled
    ops = {op.get_friendly_name(): op for op in runner._compiled[batch].get_runtime_model().get_ordered_ops()}
    # OpenVINO's counters are the running mean over every call of the request: the mean over the timed calls
    # (after WARM untimed ones) is (k * mean_k - WARM * mean_WARM) / (k - WARM), whole calls, so the layers add
    # up to the mean call's time
    warm = 2
    for _ in range(warm):
        runner(x)
    first = {p.node_name: p.real_time.total_seconds() * 1e3 for p in request.get_profiling_info()}
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner(x)
        walls.append((time.perf_counter() - t0) * 1e3)
    k = warm + runs
    nodes = {}
    for p in request.get_profiling_info():
        if p.status.name == "EXECUTED":
            total = k * p.real_time.total_seconds() * 1e3 - warm * first.get(p.node_name, 0.0)
            nodes[p.node_name] = (p.node_type, p.exec_type, max(total / runs, 0.0))
    runner.close()
    wall = float(np.mean(walls))
    layers = []
    for node, (kind, kernel, ms) in nodes.items():
        layer: dict[str, Any] = {"name": node, "type": kind, "kernel": kernel, "ms": ms}
        op = ops.get(node)
        if op is not None:
            rt = op.get_rt_info()
            layer["precision"] = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else ""
            if is_conv(kind) and op.get_input_size() >= 2:
                out_shape = op.get_output_partial_shape(0)
                out = _numel(out_shape)
                w = _numel(op.get_input_partial_shape(1))
                channels = int(out_shape[-1 if kind.startswith(("FullyConnected", "MatMul")) else 1].get_length())
                macs = out * w / channels
                nbytes = sum(_numel(op.get_input_partial_shape(i)) * op.get_input_element_type(i).size
                             for i in range(op.get_input_size()))
                nbytes += out * op.get_output_element_type(0).size
                int8 = layer["precision"] in ("u8", "i8")
                peak = peaks["int8" if int8 else "fp32"]
                compute, memory = macs / peak * 1e3, nbytes / bandwidth * 1e3
                layer.update(macs=macs, bytes=nbytes, int8=int8, compute_floor_ms=compute, memory_floor_ms=memory,
                             bound="memory" if memory > compute else "compute",
                             share_of_peak=(macs / peak * 1e3) / ms if ms > 0 else None)
        layers.append(layer)
    return summarize_ov(layers, wall, wall - sum(ms for _, _, ms in nodes.values()), batch, runs)


def summarize_ov(layers: list[dict], wall_ms: float, outside_ms: float, batch: int, calls: int) -> dict[str, Any]:
    """One profiled call's ``layers`` summed by kind; ``outside_ms``: its time outside them."""
    convs = [l for l in layers if "macs" in l]
    nodes_ms = sum(l["ms"] for l in layers)
    conv_ms = sum(l["ms"] for l in convs)
    by_type: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "count": 0})
    for l in layers:
        by_type[l["type"]]["ms"] += l["ms"]
        by_type[l["type"]]["count"] += 1
    groups = {}
    for bound in ("compute", "memory"):
        sel = [l for l in convs if l["bound"] == bound]
        groups[bound] = {"layers": len(sel), "ms": sum(l["ms"] for l in sel),
                         "floor_ms": sum(max(l["compute_floor_ms"], l["memory_floor_ms"]) for l in sel),
                         "macs": sum(l["macs"] for l in sel)}
    float_convs = [l for l in convs if not l["int8"]]
    return {
        "batch": batch, "wall_ms": wall_ms, "calls_profiled": calls, "which": "the mean call",
        "nodes_ms": nodes_ms, "outside_nodes_ms": outside_ms,
        "conv": {"layers": len(convs), "ms": conv_ms, "macs": sum(l["macs"] for l in convs),
                 "floor_ms": sum(max(l["compute_floor_ms"], l["memory_floor_ms"]) for l in convs),
                 "compute_floor_ms": sum(l["compute_floor_ms"] for l in convs),
                 **{f"{k}_bound": v for k, v in groups.items()},
                 "float_layers": len(float_convs), "float_ms": sum(l["ms"] for l in float_convs),
                 "kernels": sorted({l["kernel"] for l in convs})},
        "other_ms": nodes_ms - conv_ms,
        "by_type": dict(sorted(((k, {"ms": v["ms"], "count": int(v["count"])}) for k, v in by_type.items()),
                               key=lambda kv: -kv[1]["ms"])),
        "slowest": sorted(layers, key=lambda l: -l["ms"])[:10],
    }


def ort_profile(path: Path, x: np.ndarray, runs: int, threads: int, work: Path) -> dict[str, Any]:
    """ONNX Runtime's own profiler on the engine at ``len(x)``, with the session options of the project's
    OrtRunner (intra-op threads, one inter-op thread, sequential, spinning only during a run, ORT_ENABLE_ALL):
    per operator type its mean time over ``runs`` calls, and the quantize/dequantize nodes left unfused."""
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"ort-b{len(x)}")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(2):
        session.run(None, {name: x})
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        walls.append((time.perf_counter() - t0) * 1e3)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    measured = runs_seen[-runs:]  # the last ``runs`` are the timed ones, in order
    if not measured:
        raise RuntimeError(f"no model_run events in ONNX Runtime's profile {trace.name}")
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    by_op: dict[str, dict[str, Any]] = defaultdict(lambda: {"ms": 0.0, "nodes": set()})
    for run in measured:  # the mean call, as for OpenVINO
        for e in nodes:
            if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                op = e.get("args", {}).get("op_name", "?")
                by_op[op]["ms"] += e["dur"] / 1e3 / len(measured)
                by_op[op]["nodes"].add(e["name"])
    wall = float(np.mean(walls[-len(measured):]))
    nodes_ms = sum(v["ms"] for v in by_op.values())
    table = {k: {"ms": v["ms"], "count": len(v["nodes"])}
             for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]["ms"])}
    qdq = {k: v for k, v in table.items() if k in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")}
    conv = {k: v for k, v in table.items() if "Conv" in k or "MatMul" in k or "Gemm" in k}
    trace.unlink(missing_ok=True)
    return {"batch": len(x), "wall_ms": wall, "calls_profiled": len(measured), "which": "the mean call",
            "nodes_ms": nodes_ms, "outside_nodes_ms": wall - nodes_ms, "by_op": table,
            "conv_ms": sum(v["ms"] for v in conv.values()), "qdq_ms": sum(v["ms"] for v in qdq.values()),
            "qdq_nodes": sum(v["count"] for v in qdq.values())}


def profiles(key: str, report: dict, work: Path, x: np.ndarray, peaks: dict[str, float], bandwidth: float,
             args: argparse.Namespace) -> dict[str, Any]:
    """Per-layer profiles of the OpenVINO and ONNX Runtime engines of one model at each batch size."""
    from compressor.job import engines_of_run

    out: dict[str, Any] = {}
    names = {n for n, _, _ in ENGINES}
    for e in engines_of_run(work, report):
        for b in BATCHES:
            runs = args.profile_runs if b > 1 else 4 * args.profile_runs
            try:
                if e.target == "openvino" and e.name in names:
                    say(f"{key}: OpenVINO performance counters of {e.name} at batch {b}")
                    out[f"{e.name} b{b}"] = ov_profile(e.path, x[:b], runs, peaks, bandwidth, args.threads)
                elif e.target == "onnxruntime" and e.name in names:
                    say(f"{key}: ONNX Runtime profile of {e.name} at batch {b}")
                    out[f"{e.name} b{b}"] = ort_profile(e.path, x[:b], runs, args.threads,
                                                        HERE / "work" / "at224" / "profiles" / key / e.name)
            except Exception as exc:  # a profile is an explanation; its failure must not lose the figures
                out[f"{e.name} b{b}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# ------------------------------------------------------------------------------------------ figures


def figures(entries: list[Entry], models: dict[str, Any]) -> dict[str, Any]:
    """Peaks, bandwidth, and per model and batch each engine's p50, rate, floor, efficiency and speedup."""
    peak_rows = [e for e in entries if e.group == "peak"]
    peaks: dict[str, float] = {}
    peak_table = []
    bandwidth = None
    for e in peak_rows:
        p50 = e.extra["latency_ms"]["p50"]
        rt = e.extra.get("runtime", {})
        if e.precision == "bandwidth":
            bandwidth = e.macs / (p50 / 1e3)
            peak_table.append({"name": e.label, "precision": "memory", "p50_ms": p50, "GB_per_s": bandwidth / 1e9,
                               "kernels": rt.get("kernels"), "xml": e.extra["xml"]})
            continue
        rate = e.macs / (p50 / 1e3)
        precisions = rt.get("layer_precisions", {})
        ran_int8 = any(k.startswith("Convolution:") and k.split(":")[1] in ("u8", "i8") for k in precisions)
        peak_table.append({"name": e.name, "precision": e.precision, "macs": e.macs, "p50_ms": p50,
                           "GMAC_per_s": rate / 1e9, "kernels": rt.get("kernels"), "layer_precisions": precisions,
                           "isa": rt.get("isa"), "ran_in_int8": ran_int8, "xml": e.extra["xml"]})
        if e.precision == "int8" and not ran_int8:
            continue  # not an INT8 figure: kept in the table, not taken as the peak
        peaks[e.precision] = max(peaks.get(e.precision, 0.0), rate)
    rows = []
    for e in entries:
        if e.group == "peak":
            continue
        p50 = e.extra["latency_ms"]["p50"]
        peak = peaks.get(e.precision)
        floor_ms = e.macs / peak * 1e3 if peak else None
        rows.append({"model": e.group, "engine": e.name, "label": e.label, "precision": e.precision, "batch": e.batch,
                     "macs": e.macs, "p50_ms": p50, "p90_ms": e.extra["latency_ms"]["p90"],
                     "runs": e.extra["latency_ms"]["runs"], "GMAC_per_s": e.macs / (p50 / 1e3) / 1e9,
                     "floor_ms": floor_ms, "efficiency": floor_ms / p50 if floor_ms else None,
                     "images_per_s": e.batch / (p50 / 1e3),
                     **{k: v for k, v in e.extra.items() if k not in ("latency_ms",)}})
    for r in rows:
        eager = next((q for q in rows if q["model"] == r["model"] and q["batch"] == r["batch"]
                      and q["engine"] == "source"), None)
        r["speedup_vs_eager"] = eager["p50_ms"] / r["p50_ms"] if eager else None
        cli = models.get(r["model"], {}).get("cli_rows", {}).get(r["engine"].replace(" (copy)", ""), {})
        r["agreement"] = cli.get("agreement")
        r["top1_upscaled"] = cli.get("top1")
        r["output_sqnr_db"] = cli.get("output_sqnr_db")
    return {"peaks": peaks, "bandwidth": bandwidth, "peak_table": peak_table, "rows": rows}


def goals(rows: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    out, copies = [], {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for b in BATCHES:
            pair = [r for r in rows if r["model"] == model and r["batch"] == b and r["engine"].startswith(COPIED)]
            if len(pair) == 2:
                a, c = pair[0]["p50_ms"], pair[1]["p50_ms"]
                copies[f"{model} b{b}"] = {"p50_ms": [a, c], "gap": max(a, c) / min(a, c) - 1}
    if "resnet50" in {r["model"] for r in rows}:
        int8 = [r for r in rows if r["model"] == "resnet50" and r["batch"] == 16 and r["precision"] == "int8"
                and "(copy)" not in r["engine"]]
        if int8:
            best = min(int8, key=lambda r: r["p50_ms"])
            out.append({"figure": f"ResNet-50 batch 16: best INT8 engine ({best['label']}) over eager FP32",
                        "value": f"{best['speedup_vs_eager']:.2f}x", "asked": f">= {GOAL_SPEEDUP:g}x",
                        "passed": bool(best["speedup_vs_eager"] >= GOAL_SPEEDUP)})
            eff = best["efficiency"]
            out.append({"figure": f"ResNet-50 batch 16: {best['label']} share of the INT8 peak",
                        "value": "-" if eff is None else f"{100 * eff:.1f} %",
                        "asked": f">= {100 * GOAL_PEAK_SHARE:.0f} %",
                        "passed": bool(eff is not None and eff >= GOAL_PEAK_SHARE)})
            top = max(int8, key=lambda r: r["efficiency"] or 0)
            if top is not best:
                out.append({"figure": f"ResNet-50 batch 16: the INT8 engine closest to the INT8 peak ({top['label']})",
                            "value": f"{100 * (top['efficiency'] or 0):.1f} %", "asked": "(for reference)",
                            "passed": bool((top["efficiency"] or 0) >= GOAL_PEAK_SHARE)})
    for k, v in copies.items():
        out.append({"figure": f"copies of {COPIED} ({k}): p50 gap", "value": f"{100 * v['gap']:.1f} %",
                    "asked": f"<= {100 * GOAL_COPY_GAP:.0f} %", "passed": bool(v["gap"] <= GOAL_COPY_GAP)})
    return out, copies


def closest_and_why(fig: dict, profs: dict[str, dict]) -> list[str]:
    """Per model and batch: the engine closest to its floor, and from the profiles where the time goes."""
    lines = []
    rows = [r for r in fig["rows"] if "(copy)" not in r["engine"] and r["efficiency"] is not None]
    for model in dict.fromkeys(r["model"] for r in rows):
        for b in BATCHES:
            sel = [r for r in rows if r["model"] == model and r["batch"] == b]
            if not sel:
                continue
            top = max(sel, key=lambda r: r["efficiency"])
            fastest = min(sel, key=lambda r: r["p50_ms"])
            int8 = max((r for r in sel if r["precision"] == "int8"), key=lambda r: r["efficiency"], default=None)
            line = (f"- **{model}, batch {b}**: closest to its floor: {top['label']} at "
                    f"{100 * top['efficiency']:.1f} % of the {top['precision'].upper()} peak "
                    f"({top['p50_ms']:.2f} ms against a floor of {top['floor_ms']:.2f} ms)")
            if int8 is not None and int8 is not top:
                line += (f"; closest INT8 engine: {int8['label']} at {100 * int8['efficiency']:.1f} % "
                         f"({int8['p50_ms']:.2f} ms against {int8['floor_ms']:.2f} ms)")
            lines.append(line + f"; fastest: {fastest['label']} ({fastest['p50_ms']:.2f} ms).")
            for r in {id(top): top, id(int8): int8}.values():
                if r is not None and r["engine"].startswith("tflite"):
                    lines.append(f"  - {r['engine']}: LiteRT's Python interpreter has no per-operator profiler; "
                                 f"it ran {ran(r.get('runtime', {}))}.")
            for eng in ("nncf-openvino-int8", "openvino-fp32"):
                p = profs.get(model, {}).get(f"{eng} b{b}")
                if p and "conv" in p:
                    lines.append("  - " + ov_sentence(eng, p))
            for eng in ("ortq-onnxruntime-int8", "onnxruntime-fp32"):
                p = profs.get(model, {}).get(f"{eng} b{b}")
                if p and "by_op" in p:
                    lines.append("  - " + ort_sentence(eng, p))
    return lines


def ov_sentence(eng: str, p: dict) -> str:
    c, wall = p["conv"], p["wall_ms"]
    others = [(k, v) for k, v in p["by_type"].items() if not is_conv(k)][:3]
    parts = [f"{eng} (OpenVINO PERF_COUNT, {wall:.2f} ms a call): convolutions {c['ms']:.2f} ms "
             f"({100 * c['ms'] / wall:.0f} %) over {c['layers']} layers, against {c['floor_ms']:.2f} ms of floor "
             f"(compute-bound layers {c['compute_bound']['ms']:.2f} ms vs {c['compute_bound']['floor_ms']:.2f}; "
             f"memory-bound {c['memory_bound']['layers']} layers {c['memory_bound']['ms']:.2f} ms vs "
             f"{c['memory_bound']['floor_ms']:.2f})"]
    if c["float_layers"] and eng.endswith("int8"):
        parts.append(f"{c['float_layers']} convolutions left in float ({c['float_ms']:.2f} ms)")
    parts.append("other operators " + ", ".join(f"{k} {v['ms']:.2f} ms ({v['count']})" for k, v in others)
                 + f" ({100 * p['other_ms'] / wall:.0f} % in all)")
    parts.append(f"the call's time minus its operators' {p['outside_nodes_ms']:.2f} ms")
    return "; ".join(parts)


def ort_sentence(eng: str, p: dict) -> str:
    wall = p["wall_ms"]
    top = list(p["by_op"].items())[:4]
    text = (f"{eng} (ONNX Runtime profiler, {wall:.2f} ms a call): " +
            ", ".join(f"{k} {v['ms']:.2f} ms ({v['count']})" for k, v in top))
    if p["qdq_nodes"]:
        text += f"; {p['qdq_nodes']} quantize/dequantize nodes left unfused take {p['qdq_ms']:.2f} ms"
    return text + f"; the call's time minus its operators' {p['outside_nodes_ms']:.2f} ms"


# ------------------------------------------------------------------------------------------- report


def cpu_tag(env: dict) -> str:
    flags = env["isa_flags"]
    amx = "AMX" if "amx_int8" in flags else "no AMX"
    return f"{env['cpu']} [{', '.join(f for f in flags if f not in ('amx_tile', 'amx_int8', 'amx_bf16'))}; {amx}]"


def ran(rt: dict) -> str:
    """One line of what a runner says it ran: kernels and precisions, or delegation and batching."""
    if "kernels" in rt and "layer_precisions" in rt:  # OpenVINO
        return (f"{', '.join(f'{k} x{v}' for k, v in rt['kernels'].items())}; "
                f"{', '.join(f'{k} x{v}' for k, v in rt['layer_precisions'].items())}")
    if "delegate" in rt:  # LiteRT
        undelegated = ", ".join(f"{k} x{v}" for k, v in (rt.get("undelegated_ops") or {}).items()) or "none"
        return (f"{rt['delegate']}, {rt.get('xnnpack_partitions')} partition(s), undelegated: {undelegated}; "
                f"{rt.get('batching')}")
    if "kernels" in rt:  # ONNX Runtime: the optimized graph's operators
        top = list(rt["kernels"].items())[:5]
        return f"optimized graph: {', '.join(f'{k} x{v}' for k, v in top)}; ISA {rt.get('isa')}"
    return f"{rt.get('mode', '')} {rt.get('isa', '')}".strip() or "-"


def write_markdown(dest: Path, rep: dict) -> None:
    fig, env = rep["figures"], rep["environment"]
    tag = cpu_tag(env)
    smoke = " — SMOKE RUN, not figures" if rep["quick"] else ""
    lines = [f"# 224x224 figures and the floor (issue 23, part 3){smoke}",
             "", f"CPU: **{tag}**, {rep['threads']} threads; command: `{rep['command']}`; {rep['date']}.", ""]
    if rep["quick"]:
        lines += ["**Smoke run (--quick)**: few images, rounds and shapes, run beside other jobs: the figures below "
                  "check that the benchmark works; they are not measurements.", ""]
    if rep["load"].get("under_load"):
        lines += [f"**Timed under load**: {'; '.join(rep['load']['reasons'])}.", ""]
    lines += ["## Goals", "", "| figure | value | asked | verdict | CPU |", "|---|---|---|---|---|"]
    for g in rep["goals"]:
        verdict = "pass" if g["passed"] else "**FAIL**"
        lines.append(f"| {g['figure']} | {g['value']} | {g['asked']} | {verdict} | {tag} |")
    lines += ["", "## Every engine at batch 1 and 16 (one interleaved session)", "",
              "p50 of the session (median); MACs: convolutions and linear layers of one 224x224 image times the batch; "
              "floor = MACs / measured peak of the engine's precision; efficiency = floor / p50; agreement with the "
              "eager FP32 source on the CLI run's test images ("
              + ", ".join(f"{k}: {m['images']}" for k, m in rep["models"].items()) + ").", "",
              "| model | engine | batch | p50 ms | p90 ms | img/s | GMAC/s | floor ms | efficiency | x eager FP32 | "
              "agreement % | CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in fig["rows"]:
        eff = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f} %"
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.3f}"
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.1f}"
        lines.append(f"| {r['model']} | {r['label']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['GMAC_per_s']:.1f} | {floor} | {eff} | "
                     f"{r['speedup_vs_eager']:.2f}x | {agree} | {tag} |")
    lines += ["", "## The CPU's peak, through OpenVINO's own kernels (same session, same threads)", "",
              "| kernel | precision | p50 ms | rate | OpenVINO kernel (runtime precision) | CPU |",
              "|---|---|---|---|---|---|"]
    for p in fig["peak_table"]:
        if p["precision"] == "memory":
            lines.append(f"| {p['name']} | - | {p['p50_ms']:.3f} | {p['GB_per_s']:.1f} GB/s | "
                         f"{', '.join(p['kernels'] or {})} | {tag} |")
        else:
            note = "" if p["precision"] == "fp32" or p["ran_in_int8"] else " **not INT8: not taken as the peak**"
            lines.append(f"| {p['name']} | {p['precision'].upper()} | {p['p50_ms']:.3f} | "
                         f"{p['GMAC_per_s']:.1f} GMAC/s | "
                         f"{', '.join(p['kernels'] or {})} ({', '.join(p['layer_precisions'] or {})}){note} | {tag} |")
    peaks = fig["peaks"]
    lines += ["", "Peak taken: " + ", ".join(f"{k.upper()} {v / 1e9:.1f} GMAC/s" for k, v in peaks.items())
              + (f" (INT8/FP32 {peaks['int8'] / peaks['fp32']:.2f}x)" if {"int8", "fp32"} <= set(peaks) else "")
              + (f"; memory read {fig['bandwidth'] / 1e9:.1f} GB/s" if fig["bandwidth"] else "") + f"; {tag}.", ""]
    if rep["copies"]:
        lines += ["## Two copies of one engine", "", "| pair | p50 ms | p50 ms (copy) | gap | CPU |",
                  "|---|---|---|---|---|"]
        for k, v in rep["copies"].items():
            lines.append(f"| {COPIED} {k} | {v['p50_ms'][0]:.3f} | {v['p50_ms'][1]:.3f} | {100 * v['gap']:.1f} % | "
                         f"{tag} |")
        lines.append("")
    lines += ["## What each engine ran", "", "| model | engine | runtime | what it ran |", "|---|---|---|---|"]
    for r in fig["rows"]:
        if r["batch"] == max(BATCHES) and "(copy)" not in r["engine"]:
            lines.append(f"| {r['model']} | {r['label']} | {r.get('runtime', {}).get('runtime', '-')} | "
                         f"{ran(r.get('runtime', {}))} |")
    lines += ["", "## Closest to the floor, and why", ""]
    over = [r for r in fig["rows"] if (r["efficiency"] or 0) > 1]
    if over:
        lines += [f"**{len(over)} row(s) above 100 % of the peak** ("
                  + ", ".join(f"{r['model']} {r['label']} b{r['batch']}" for r in over[:4])
                  + "): in this session the microbenchmark fell short of what the kernels can do (a busy machine, "
                  "or a shape the kernels run below their best); the efficiencies overstate.", ""]
    lines += rep["why"] + [""]
    for model, profs in rep["profiles"].items():
        for name, p in profs.items():
            if "error" in p:
                lines += [f"### {model}: {name}", "", f"profile failed: {p['error']}", ""]
                continue
            lines += [f"### {model}: {name} ({p['wall_ms']:.3f} ms a call, the mean of {p['calls_profiled']} "
                      f"profiled; {tag})", ""]
            if "conv" in p:
                lines += ["| operator type | ms | calls | share |", "|---|---|---|---|"]
                for k, v in list(p["by_type"].items())[:8]:
                    lines.append(f"| {k} | {v['ms']:.3f} | {v['count']} | {100 * v['ms'] / p['wall_ms']:.0f} % |")
                lines.append(f"| (the call's time minus its operators') | {p['outside_nodes_ms']:.3f} | - | "
                             f"{100 * p['outside_nodes_ms'] / p['wall_ms']:.0f} % |")
                lines += ["", "Slowest layers:", "",
                          "| layer | type | kernel | precision | ms | GMAC/s | share of peak | bound |",
                          "|---|---|---|---|---|---|---|---|"]
                for l in p["slowest"][:6]:
                    gm = f"{l['macs'] / l['ms'] / 1e6:.1f}" if l.get("macs") and l["ms"] else "-"
                    sh = f"{100 * l['share_of_peak']:.0f} %" if l.get("share_of_peak") else "-"
                    lines.append(f"| {l['name'][:60]} | {l['type']} | {l['kernel']} | {l.get('precision', '')} | "
                                 f"{l['ms']:.3f} | {gm} | {sh} | {l.get('bound', '-')} |")
            else:
                lines += ["| operator | ms | nodes | share |", "|---|---|---|---|"]
                for k, v in list(p["by_op"].items())[:8]:
                    lines.append(f"| {k} | {v['ms']:.3f} | {v['count']} | {100 * v['ms'] / p['wall_ms']:.0f} % |")
                lines.append(f"| (the call's time minus its operators') | {p['outside_nodes_ms']:.3f} | - | "
                             f"{100 * p['outside_nodes_ms'] / p['wall_ms']:.0f} % |")
            lines.append("")
    lines += ["## Models and how they were built", "",
              "| model | MACs at 224 (conv + linear) | torch_pruning count | CLI run | images evaluated | calibration "
              "images | build s | engines missing |", "|---|---|---|---|---|---|---|---|"]
    for key, m in rep["models"].items():
        lines.append(f"| {key} | {m['macs']['macs'] / 1e9:.3f} G | {m['macs']['torch_pruning_macs'] / 1e9:.3f} G | "
                     f"`{m['run_dir']}` | {m['images']} | {m['calibration']} | {m['build_s']:.0f} | "
                     f"{', '.join(m['missing_engines']) or '-'} |")
    lines += ["", "## Method and caveats", "",
              "- **Top-1 means nothing here**: the models were trained on 32x32 CIFAR-10 and are fed CIFAR-10 test "
              "images upscaled to 224x224 by the tool's data path; only latency, the MAC rates and agreement with "
              "the eager FP32 source are real figures (top-1 on the upscaled images is in report.json as "
              "`top1_upscaled`).",
              f"- Timing: compressor.evaluate.latency over all {rep['entries']} entries at once "
              f"({rep['timing']['loop']}); a batch-16 entry is the same runner handed a fixed batch of 16 images; "
              f"{rep['timing']['seconds']:.0f} s.",
              "- Peak: the best of the convolution shapes above, each one OpenVINO IR (openvino opset API) run by the "
              "project's OVRunner (latency hint, 1 stream, the same threads); the INT8 ones are written as NNCF writes "
              "a quantized convolution (u8 FakeQuantize on the activations, i8 weights with a per-channel scale), and "
              "the kernel and runtime precision the plugin chose are recorded from its runtime model.",
              "- Memory floor of a layer: bytes of its inputs, weights and output at their runtime precision over the "
              "measured read bandwidth; a layer is memory-bound where that floor exceeds MACs / peak.",
              "- Profiles: OpenVINO's PERF_COUNT on a runner compiled as the session's (the project's OVRunner); ONNX "
              "Runtime's profiler with the project's OrtRunner session options; of each, the mean call over those "
              "profiled (its layers add up to its time). LiteRT's Python interpreter has no per-operator "
              "profiler: its rows show delegation only (runtime in report.json).",
              "- The CLI run's own latency columns (in its report under the run directory) are a token timing; the "
              "figures are this session's.", ""]
    write_text(dest / "report.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated: resnet50,mobilenetv2 (default both; --quick: "
                                                   "mobilenetv2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer images, rounds, shapes; MobileNetV2 only")
    ap.add_argument("--images", type=int, default=None, help="test images for agreement (default 500; quick 32)")
    ap.add_argument("--calibration", type=int, default=None, help="calibration images (default 512; quick 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 30; quick 2)")
    ap.add_argument("--runs", type=int, default=None,
                    help="timed calls per entry over all rounds (default 60; quick 10)")
    ap.add_argument("--min-seconds", type=float, default=None, help="timed seconds per entry (default 3.0; quick 0.1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per entry before the rounds (default 3; "
                                                              "quick 1)")
    ap.add_argument("--profile-runs", type=int, default=None, help="profiled calls at batch 16 (4x at batch 1; "
                                                                    "default 5; quick 1)")
    ap.add_argument("--reuse", action="store_true",
                    help="time the engines a previous run left in benchmarks/work/at224/")
    ap.add_argument("--out", type=Path, default=None, help="report directory (default benchmarks/results/at224; "
                                                           "quick: benchmarks/work/at224/quick)")
    args = ap.parse_args()
    q = args.quick
    defaults = {"images": (500, 32), "calibration": (512, 16), "rounds": (30, 2), "runs": (60, 10),
                "min_seconds": (3.0, 0.1), "warmup": (3, 1), "profile_runs": (5, 1)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    keys = (args.models or ("mobilenetv2" if q else "resnet50,mobilenetv2")).split(",")
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}", file=sys.stderr)
        sys.exit(2)
    dest = args.out or (HERE / "work" / "at224" / "quick" if q else HERE / "results" / "at224")
    started = time.perf_counter()
    from compressor.environment import environment

    env = environment(args.threads)
    models: dict[str, Any] = {}
    builds = {}
    for key in keys:
        say(f"{key}: building every CPU engine at {SIZE}x{SIZE}")
        report, work, seconds = build(key, args)
        builds[key] = (report, work)
        models[key] = {"run_dir": rel(work), "build_s": round(seconds, 1), "cli_command": report.get("command"),
                       "model_input": report.get("model_input"),
                       "cli_rows": {r["name"]: {k: r.get(k) for k in CLI_FIELDS} for r in report["results"]},
                       "cli_failures": report.get("failures"),
                       "images": report.get("data", {}).get("evaluation", {}).get("images"),
                       "calibration": report.get("data", {}).get("calibration", {}).get("samples_used")}
        if models[key]["images"] != args.images or models[key]["calibration"] != args.calibration:
            say(f"{key}: the run holds {models[key]['images']} evaluated and {models[key]['calibration']} calibration "
                f"images, not {args.images} and {args.calibration}: its figures say what it holds")
    owned: list[Runner] = []
    entries: list[Entry] = []
    xs = {}
    try:
        for key in keys:
            report, work = builds[key]
            got, info = model_entries(key, report, work, args, owned)
            entries += got
            models[key].update(info)
            xs[key] = next(e.runner.x for e in got if e.batch == max(BATCHES))
        entries += peak_entries(args, owned)
        say(f"timing {len(entries)} entries in one session ({args.rounds} rounds)")
        timing, load = time_session(entries, args)
    finally:
        for r in owned:
            r.close()
    fig = figures(entries, models)
    profs: dict[str, Any] = {}
    t0 = time.perf_counter()
    if fig["bandwidth"] and {"int8", "fp32"} <= set(fig["peaks"]):
        for key in keys:
            report, work = builds[key]
            profs[key] = profiles(key, report, work, xs[key], fig["peaks"], fig["bandwidth"], args)
    profile_s = time.perf_counter() - t0
    goal_rows, copies = goals(fig["rows"])
    command = " ".join(["python", rel(Path(__file__)), *sys.argv[1:]])
    rep = {"benchmark": "at224", "issue": 23, "part": 3, "quick": q, "command": command,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "environment": env, "cpu": cpu_tag(env),
           "threads": args.threads, "images": args.images, "calibration": args.calibration, "size": SIZE,
           "batches": list(BATCHES), "entries": len(entries), "timing": timing, "load": load,
           "goals": goal_rows, "copies": copies, "figures": fig, "models": models, "profiles": profs,
           "why": closest_and_why(fig, profs),
           "seconds": {"build": {k: m["build_s"] for k, m in models.items()}, "session": timing["seconds"],
                       "profiles": round(profile_s, 1), "total": round(time.perf_counter() - started, 1)}}
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "report.json", json.dumps(rep, indent=1, default=str) + "\n")
    write_markdown(dest, rep)
    say(f"wrote {rel(dest / 'report.md')} and report.json ({rep['seconds']['total']:.0f} s)")
    for g in goal_rows:
        print(f"  {g['figure']}: {g['value']} (asked {g['asked']}) -> {'pass' if g['passed'] else 'FAIL'}")


if __name__ == "__main__":
    main()
