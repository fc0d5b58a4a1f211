"""Issue 23, part 4: the architectures users bring, at 224x224, through every CPU INT8 target.

torchvision's VisionTransformer (vit_b_16, or with ``--vit small`` the same structure at 4 layers,
6 heads, width 384, MLP 1536), swin_t, convnext_tiny, efficientnet_b0, regnet_y_400mf and
mobilenet_v3_large, with **seeded random weights** (torch.manual_seed(0), torchvision's own
initialisation, 10 classes for CIFAR-10's labels; a weight matrix torchvision initialises to zero,
ViT's classifier, is drawn from N(0, 0.02) instead, or every logit would be 0), calibrated on real
images: CIFAR-10's, upscaled to 224 by the tool's data path. The BatchNorm running statistics of the
CNNs are estimated on 64 of the training images first (the weights stay random): with torchvision's
initial statistics (mean 0, variance 1) a random network's activations grow or vanish with depth,
which no trained network shows, and the INT8 ranges would say nothing.

For each architecture one ``compress`` run (2 threads) builds OpenVINO, ONNX Runtime and TFLite FP32
engines and the INT8 engines: NNCF -> OpenVINO, ONNX Runtime QDQ, TFLite PT2E full integer; the
transformers (ViT, Swin) quantize with ``quantize_ptq: {model_type: transformer}`` (SmoothQuant
``auto``: NNCF's alpha 0.95 where it brings the output closer to FP32, else none; and the TFLite
target's ``model_type: transformer``) and, for the comparison, also with SmoothQuant 0.95, with it
off, and with the CNN defaults.

Random BatchNorm CNNs are chaotic: they amplify any small error (a 40 dB input perturbation comes out
of the random EfficientNet-B0 at 3-8 dB), which trained networks do not; even BatchNorm statistics
estimated layer by layer in eval mode left it at 3 dB. Their INT8 SQNR is therefore near 0 dB and says
nothing about a trained model's; the report gives, per architecture, the FP32 model's own output SQNR
under 40 dB input noise to read it against. The transformers and ConvNeXt (LayerNorm, layer scale)
are not chaotic (40-50 dB), so their SQNR compares settings and runtimes meaningfully. Batch-1 latency of all engines of an
architecture is timed in one interleaved session, so a speedup is INT8 p50 over the same runtime's
FP32 p50 from the same rounds. Then ``compress explain RUN`` explains every engine (per-layer SQNR
against the float model; ``--sensitivity`` adds the per-quantizer ranking, slow at 224).

Output SQNR is of the engine's logits against the FP32 source's on the evaluation images (the report's
``output_sqnr_db``), and in the explanation on images held out of the calibration split. Top-1 means
nothing with random weights and is not reported. Where a target cannot take an architecture the
table gives the tool's one line (a target's failure, or the failing pass of its branch, which is then
left out and the run repeated without it).

Writes benchmarks/results/architectures/report.json and report.md (tables first); work files
under benchmarks/work/architectures/.

Usage: python benchmarks/architectures.py [--archs vit,swin_t,...] [--vit b16|small]
       [--calibration 300] [--images 100] [--explain-images 32] [--sensitivity] [--no-compare] [--keep-cache]
Smoke: python benchmarks/architectures.py --smoke   (efficientnet_b0 and the small ViT, few images)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from _common import COMPRESS, HERE, REPO, SHARED, require_modules, scrub, write_text

NAME = "architectures"
WORK = HERE / "work" / NAME
RESULTS = HERE / "results" / NAME
CACHE = WORK / "cache"
"""the runs' own pass cache, emptied at the start (--keep-cache keeps it): every pass of a run is timed
and computed with this code, never taken from an earlier run's cache"""
DATA = SHARED / "datasets" / "cifar10"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
NUM_CLASSES = 10
ARCHS = ("vit", "swin_t", "convnext_tiny", "efficientnet_b0", "regnet_y_400mf", "mobilenet_v3_large")
TRANSFORMERS = ("vit", "swin_t")
SMALL_VIT = {"image_size": 224, "patch_size": 16, "num_layers": 4, "num_heads": 6, "hidden_dim": 384,
             "mlp_dim": 1536}
INT8_TARGETS = {  # engine name in the run -> (target label, runtime's FP32 engine)
    "nncf-openvino-int8": ("OpenVINO (NNCF)", "openvino-fp32"),
    "ortq-onnxruntime-int8": ("ONNX Runtime QDQ", "onnxruntime-fp32"),
    "tflite-int8": ("TFLite INT8 (PT2E)", "tflite-fp32"),
}
COMPARISONS = {  # transformers only: the same backends with other settings
    "nncf_sq-openvino-int8": ("OpenVINO (NNCF), transformer, SmoothQuant 0.95", "openvino-fp32"),
    "nncf_nosq-openvino-int8": ("OpenVINO (NNCF), transformer, SmoothQuant off", "openvino-fp32"),
    "nncf_cnn-openvino-int8": ("OpenVINO (NNCF), CNN defaults", "openvino-fp32"),
    "ortq_cnn-onnxruntime-int8": ("ONNX Runtime QDQ, CNN defaults", "onnxruntime-fp32"),
    "tflite-int8-2": ("TFLite INT8 (PT2E), CNN defaults", "tflite-fp32"),
}


# ---------------------------------------------------------------------- models

def build_label(arch: str, vit: str) -> str:
    """The display name of an architecture (build_model's)."""
    if arch != "vit":
        return arch
    return "vit_b_16" if vit == "b16" else "vit (4 layers, 6 heads, 384 wide)"


def build_model(arch: str, vit: str, bn_images: Any) -> tuple[Any, str]:
    """The seeded random model and its display name."""
    import torch
    import torchvision

    torch.manual_seed(0)
    if arch == "vit":
        if vit == "b16":
            model = torchvision.models.vit_b_16(weights=None, num_classes=NUM_CLASSES)
        else:
            from torchvision.models.vision_transformer import VisionTransformer

            model = VisionTransformer(**SMALL_VIT, num_classes=NUM_CLASSES)
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES)
    label = build_label(arch, vit)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():  # ViT's head: zero logits otherwise
                p.normal_(0.0, 0.02)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        model.train()
        with torch.no_grad():
            for i in range(0, len(bn_images), 16):
                model(torch.from_numpy(bn_images[i : i + 16]))
    return model.eval(), label


def bn_calibration_images(count: int) -> Any:
    """``count`` CIFAR-10 training images at 224, as the tool decodes and normalises them."""
    from compressor.artifact import Preprocessing
    from compressor.data import DataConfig, open_data, preprocess

    prep = Preprocessing(**IMAGENET)
    data = open_data(DataConfig(source="cifar10", root=str(DATA), download=False,
                                calibration={"samples": count, "seed": 1}))
    return preprocess(data.calibration_images((224, 224), prep, count), prep)


# ---------------------------------------------------------------------- recipes

def recipe(arch: str, args: argparse.Namespace, dropped: set[str]) -> tuple[str, list[str]]:
    """The recipe's text and the names of its branches, in order."""
    transformer = arch in TRANSFORMERS
    mt = ", model_type: transformer" if transformer else ""
    branches = [("nncf", ["quantize_ptq: {backend: openvino%s}" % mt], "openvino"),
                ("ortq", ["export_onnx", "quantize_ptq: {backend: onnxruntime%s}" % mt], "onnxruntime")]
    if transformer and args.compare:
        branches += [("nncf_sq", ["quantize_ptq: {backend: openvino, model_type: transformer, smooth_quant: 0.95}"],
                      "openvino"),
                     ("nncf_nosq", ["quantize_ptq: {backend: openvino, model_type: transformer, smooth_quant: 'off'}"],
                      "openvino"),
                     ("nncf_cnn", ["quantize_ptq: {backend: openvino}"], "openvino"),
                     ("ortq_cnn", ["export_onnx", "quantize_ptq: {backend: onnxruntime}"], "onnxruntime")]
    lines = [f"name: arch-{arch}",
             "model: {input_shape: [1, 3, 224, 224]}",
             "data:",
             "  source: cifar10",
             f"  calibration: {{split: train, samples: {args.calibration}, seed: 0}}",
             f"  evaluation: {{split: test, limit: {args.images}}}",
             "passes: []",
             "targets:",
             "  - openvino: {precision_hint: f32}",
             "  - onnxruntime",
             "  - tflite: {quantization: none}",
             "  - tflite: {quantization: int8%s}" % mt,
             *(["  - tflite: {quantization: int8}"] if transformer and args.compare else []),
             "branches:"]
    for name, passes, target in branches:
        if name in dropped:
            continue
        lines += [f"  - name: {name}", "    passes:", *(f"      - {p}" for p in passes), f"    targets: [{target}]"]
    names = [name for name, _, _ in branches if name not in dropped]
    if not names:
        lines.pop()
    lines += ["evaluation:",
              "  batch_size: 16",
              "  warmup: 3",
              "  latency_runs: 10",
              f"  latency_min_seconds: {args.latency_seconds}",
              f"  latency_rounds: {args.latency_rounds}",
              "  paced_runs: 3",
              "  throughput_batch: 8",
              "  throughput_seconds: 1"]
    return "\n".join(lines) + "\n", names


# ---------------------------------------------------------------------- running

def compress(*args: str) -> tuple[int, str]:
    """Run the CLI; its exit code and its last ``error:`` line (or last line of stderr)."""
    cmd = [str(COMPRESS), *args]
    print("$", scrub(" ".join(cmd)), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode not in (0, 1):
        sys.stdout.write(proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return proc.returncode, (errors or lines or [""])[-1]


def run_arch(arch: str, args: argparse.Namespace, bn_images: Any) -> dict[str, Any]:
    import torch

    d = WORK / arch
    d.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, label = build_model(arch, args.vit, bn_images)
    torch.save(model, d / "model.pt")
    (d / "model.json").write_text(json.dumps({"input_shape": [1, 3, 224, 224], "preprocessing": IMAGENET,
                                              "classes": [str(i) for i in range(NUM_CLASSES)]}))
    macs = count_macs(model)
    sensitivity = noise_sqnr(model, bn_images[:8])
    dropped: dict[str, str] = {}  # branch -> the one line its failing pass gave
    out = d / "run"
    while True:
        text, names = recipe(arch, args, set(dropped))
        (d / "recipe.yaml").write_text(text)
        code, line = compress(str(d / "model.pt"), "--recipe", str(d / "recipe.yaml"), "--trust-model",
                              "--data", str(DATA), "--threads", "2", "--out", str(out), "--overwrite",
                              "--cache-dir", str(CACHE))
        if code in (0, 1):
            break
        failed = re.search(r"\(branches\[(\d+)\]\.", line)
        if not failed or int(failed.group(1)) >= len(names):
            return {"arch": arch, "label": label, "error": line, "seconds": round(time.perf_counter() - started)}
        dropped[names[int(failed.group(1))]] = line
    run_seconds = time.perf_counter() - started
    explain_args = [str(out), "--trust-model", "--threads", "2", "--images", str(args.explain_images), "--overwrite",
                    "--cache-dir", str(CACHE)]
    if not args.sensitivity:
        explain_args.append("--no-sensitivity")
    code, line = compress("explain", *explain_args)
    report = json.loads((out / "report.json").read_text())
    explained = json.loads((out / "explain.json").read_text()) if code == 0 else None
    return {"arch": arch, "label": label, "macs": macs, "noise_sqnr_db": sensitivity, "report": report,
            "explain": explained, "compare": args.compare,
            "explain_error": None if code == 0 else line, "dropped": dropped,
            "run_seconds": round(run_seconds), "seconds": round(time.perf_counter() - started)}


def reused(arch: str, args: argparse.Namespace, bn_images: Any) -> dict[str, Any] | None:
    """``--reuse``: the result of an architecture whose run and explanation an earlier invocation finished
    (work/ARCH/run/report.json and explain.json newer than work/ARCH/model.pt), with its MACs and noise SQNR
    computed again from the saved model; None where there is none."""
    import torch

    d = WORK / arch
    out = d / "run"
    model_file, report_file, explain_file = d / "model.pt", out / "report.json", out / "explain.json"
    if not (model_file.is_file() and report_file.is_file()):
        return None
    if report_file.stat().st_mtime < model_file.stat().st_mtime:
        return None
    explain_done = explain_file.is_file() and explain_file.stat().st_mtime >= report_file.stat().st_mtime
    model = torch.load(model_file, weights_only=False)
    _, names = recipe(arch, args, set())
    kept = re.findall(r"^  - name: (\S+)", (d / "recipe.yaml").read_text(), flags=re.M)
    label = build_label(arch, args.vit)
    seconds = round(max(report_file.stat().st_mtime, explain_file.stat().st_mtime if explain_done else 0)
                    - model_file.stat().st_mtime)
    return {"arch": arch, "label": label, "macs": count_macs(model), "noise_sqnr_db": noise_sqnr(model, bn_images[:8]),
            "report": json.loads(report_file.read_text()),
            "explain": json.loads(explain_file.read_text()) if explain_done else None, "compare": args.compare,
            "explain_error": None if explain_done else "no explanation kept", "reused": True,
            "dropped": {n: "left out (its failing line was not kept)" for n in names if n not in kept},
            "run_seconds": round(report_file.stat().st_mtime - model_file.stat().st_mtime), "seconds": seconds}


def noise_sqnr(model: Any, images: Any, snr_db: float = 40.0) -> float:
    """Output SQNR of the FP32 model (dB) when its input carries Gaussian noise at ``snr_db``: how much
    the network amplifies a small error. Random BatchNorm CNNs are chaotic (a 40 dB input error comes
    out at 3-20 dB), trained networks are not: an INT8 SQNR reads against this figure."""
    import numpy as np
    import torch

    x = torch.from_numpy(images)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * x.std() * 10 ** (-snr_db / 20)
    with torch.no_grad():
        clean, noisy = model(x).double(), model(x + noise).double()
    return round(10 * float(np.log10((clean ** 2).sum().item() / ((clean - noisy) ** 2).sum().item())), 1)


def count_macs(model: Any) -> int | None:
    """Multiply-accumulates of one 224x224 image (conv and linear layers, and the attention matmuls
    torch's FLOP counter sees), from torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        return int(counter.get_total_flops() // 2)
    except Exception:  # noqa: BLE001 - a figure for the table only
        return None


# ---------------------------------------------------------------------- tables

MAIN_TARGETS = ("openvino-fp32", "onnxruntime-fp32", "tflite-fp32", "tflite-int8", "tflite-int8-2")  # recipe order


def failure_of(report: dict[str, Any], engine: str) -> str | None:
    """The report's failure line for an engine: a main target by its place in the recipe, a branch's
    engine by its branch."""
    if engine in MAIN_TARGETS:
        prefix = f"targets[{MAIN_TARGETS.index(engine)}]"
    else:
        branches = [b.get("name") for b in (report.get("recipe_config") or {}).get("branches") or []]
        name = engine.split("-")[0]
        if name not in branches:
            return None
        prefix = f"branches[{branches.index(name)}]"
    return next((f["reason"] for f in report.get("failures", []) if f["step"].startswith(prefix)), None)


INTEGER_KERNELS = ("QLinear", "ConvInteger", "MatMulInteger", "DynamicQuantize", "QGemm", "QAttention")
LAYOUT_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Gather", "Concat", "Slice",
              "Identity", "Constant"}


def runtime_note(result: dict[str, Any]) -> str | None:
    """Where an INT8 engine leaves its runtime's fast path, from the runtime's own record (report.json
    runtime): LiteRT's XNNPACK partitions and the operators left to the built-in kernels; ONNX
    Runtime's optimized graph: the QuantizeLinear / DequantizeLinear it kept and the float operators
    between them."""
    rt = result.get("runtime") or {}
    if "xnnpack_partitions" in rt:
        outside = ", ".join(f"{k} x{v}" for k, v in (rt.get("undelegated_ops") or {}).items())
        return f"XNNPACK: {rt['xnnpack_partitions']} partition(s)" + (f"; built-in kernels: {outside}"
                                                                        if outside else "")
    kernels = rt.get("kernels")
    if kernels:
        qdq = {k: v for k, v in kernels.items() if k in ("QuantizeLinear", "DequantizeLinear")}
        floats = {k: v for k, v in kernels.items() if k not in qdq and k not in LAYOUT_OPS
                  and not k.startswith(INTEGER_KERNELS)}
        integer = sum(v for k, v in kernels.items() if k.startswith(INTEGER_KERNELS))
        return (f"integer kernels x{integer}; Q/DQ kept: " + (", ".join(f"{k} x{v}" for k, v in qdq.items()) or "none")
                + ("; float: " + ", ".join(f"{k} x{v}" for k, v in sorted(floats.items(), key=lambda kv: -kv[1]))
                   if floats else ""))
    return None


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per INT8 target (and comparison) of an architecture: SQNR, latency, speedup, or the one
    line that says why not."""
    if "error" in result:
        return [{"arch": result["arch"], "target": label, "engine": engine, "failure": result["error"]}
                for engine, (label, _) in INT8_TARGETS.items()]
    report, explained = result["report"], result["explain"] or {"engines": {}}
    results = {r["name"]: r for r in report["results"]}
    targets = dict(INT8_TARGETS)
    if result["arch"] in TRANSFORMERS and result["compare"]:
        targets.update(COMPARISONS)
    rows = []
    for engine, (label, fp32) in targets.items():
        row: dict[str, Any] = {"arch": result["arch"], "target": label, "engine": engine}
        branch = engine.split("-")[0]
        if engine in results and fp32 in results:
            r, f = results[engine], results[fp32]
            e = explained["engines"].get(engine, {})
            row.update(sqnr_db=_round(r.get("output_sqnr_db")), explain_sqnr_db=_round(e.get("output_sqnr_db")),
                       int8_p50_ms=_round(r["latency_ms"]["p50"], 3), fp32_p50_ms=_round(f["latency_ms"]["p50"], 3),
                       speedup=_round(f["latency_ms"]["p50"] / r["latency_ms"]["p50"], 2),
                       agreement=r.get("agreement"), explained=engine in explained["engines"],
                       runtime_note=runtime_note(r), fp32_runtime_note=runtime_note(f),
                       worst_layer=worst(e), **pass_metrics(report, branch))
        elif branch in result["dropped"]:
            row["failure"] = result["dropped"][branch]
        else:
            missing = fp32 if engine in results else engine
            row["failure"] = failure_of(report, missing) or f"{missing}: not in the report"
        rows.append(row)
    return rows


def pass_metrics(report: dict[str, Any], branch: str) -> dict[str, Any]:
    """Of a branch's quantize_ptq pass: int8_inputs (op type: [ops with an INT8 input, ops]) and the
    SmoothQuant alpha used (with smooth_quant auto, the choice and both SQNRs on calibration images)."""
    branches = [b.get("name") for b in (report.get("recipe_config") or {}).get("branches") or []]
    if branch not in branches:
        return {}
    prefix = f"branches[{branches.index(branch)}]"
    for p in report.get("passes", []):
        if p.get("name") == "quantize_ptq" and p.get("step", "").startswith(prefix):
            m = p.get("metrics") or {}
            return {k: m[k] for k in ("int8_inputs", "smooth_quant_alpha", "smooth_quant_choice") if k in m}
    return {}


def worst(entry: dict[str, Any]) -> str | None:
    from compressor.fidelity.explain import worst_layer

    w = worst_layer(entry) if entry else None
    return f"{w['name']}: {w['why']}" if w else None


def _round(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(float(v), digits)


def _fmt(v: Any, suffix: str = "") -> str:
    return "-" if v is None else f"{v}{suffix}"


def smooth_quant(row: dict[str, Any]) -> str:
    choice = row.get("smooth_quant_choice")
    if choice:
        scores = ", ".join(f"{k}: {v} dB" for k, v in choice["output_sqnr_db"].items())
        return f"auto: {_fmt(choice['chosen']) if choice['chosen'] is not None else 'off'} ({scores})"
    if "smooth_quant_alpha" not in row:
        return "-"
    return "off" if row["smooth_quant_alpha"] is None else str(row["smooth_quant_alpha"])


def earlier(archs: list[str], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The rows and entries of the architectures the last report holds and this invocation does not run
    (one invocation per architecture fits a session; each entry keeps its own CPU and command). Kept only
    where they were made with the same settings (ViT size, calibration and evaluation images)."""
    old_file = RESULTS / "report.json"
    if not old_file.is_file():
        return {"rows": [], "architectures": []}
    old = json.loads(old_file.read_text())
    same = all(old.get("settings", {}).get(k) == getattr(args, k) for k in ("vit", "calibration", "images"))
    if not same:
        return {"rows": [], "architectures": []}
    keep = [a for a in old.get("architectures", []) if a["arch"] not in archs]
    for a in keep:  # entries of reports written before each kept its own
        a.setdefault("cpu", old["environment"]["cpu"])
        a.setdefault("isa_flags", old["environment"]["isa_flags"])
        a.setdefault("command", old.get("command"))
    names = {a["arch"] for a in keep}
    return {"rows": [r for r in old.get("rows", []) if r["arch"] in names], "architectures": keep}


def markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    cpus = {a.get("command"): f"{a.get('cpu')} ({', '.join(a.get('isa_flags') or [])})" for a in payload["architectures"]}
    lines = ["# The architectures users bring: every CPU INT8 target at 224x224 (issue 23, part 4)", "",
             f"CPU: {env['cpu']} ({', '.join(env['isa_flags']) or 'no AVX flags'}), {env['threads']} threads. "
             f"Seeded random weights, {NUM_CLASSES} classes; calibration: {payload['settings']['calibration']} "
             f"CIFAR-10 training images upscaled to 224; evaluation: {payload['settings']['images']} test images; "
             "top-1 means nothing with random weights and is left out.", "",
             *(["Architectures measured by separate invocations (each timed alone, in sessions of its own): "
                + "; ".join(f"{', '.join(a['arch'] for a in payload['architectures'] if a.get('command') == c)}: "
                            f"`{c}` on {cpus[c]}" for c in dict.fromkeys(a.get("command") for a in payload["architectures"])
                            if c), ""]
               if len({a.get("command") for a in payload["architectures"]}) > 1 else []),
             "## SQNR of the logits against FP32 (dB) and speedup over the same runtime's FP32", "",
             "| architecture | " + " | ".join(label for label, _ in INT8_TARGETS.values()) +
             " | FP32 with 40 dB input noise |",
             "|---|" + "---|" * (len(INT8_TARGETS) + 1)]
    by_arch: dict[str, dict[str, dict[str, Any]]] = {}
    for r in payload["rows"]:
        by_arch.setdefault(r["arch"], {})[r["engine"]] = r
    labels = {a["arch"]: a["label"] for a in payload["architectures"]}
    noise = {a["arch"]: a.get("noise_sqnr_db") for a in payload["architectures"]}
    for arch, cells in by_arch.items():
        out = []
        for engine in INT8_TARGETS:
            r = cells.get(engine)
            if r is None:
                out.append("-")
            elif "failure" in r:
                out.append("fails (below)")
            else:
                out.append(f"{_fmt(r['sqnr_db'])} dB, {_fmt(r['speedup'], 'x')}")
        lines.append(f"| {labels.get(arch, arch)} | " + " | ".join(out) + f" | {_fmt(noise.get(arch))} dB |")
    lines += ["", "## Every row", "",
              "| architecture | target | SQNR dB (eval) | SQNR dB (explain) | INT8 p50 ms | FP32 p50 ms | speedup | "
              "ops with INT8 input (LayerNorm / softmax / add) | SmoothQuant | worst layer (explain) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "failure" in r:
            lines.append(f"| {labels.get(r['arch'], r['arch'])} | {r['target']} | fails: "
                         f"{r['failure'].replace('|', '/')} | | | | | | | |")
            continue
        kf = r.get("int8_inputs") or {}
        kept = " / ".join(f"{k} {v[0]}/{v[1]}" for k, v in kf.items()
                          if k in ("MVN", "LayerNormalization", "Softmax", "Add")) or "-"
        lines.append(f"| {labels.get(r['arch'], r['arch'])} | {r['target']} | {_fmt(r['sqnr_db'])} | "
                     f"{_fmt(r['explain_sqnr_db'])} | {_fmt(r['int8_p50_ms'])} | {_fmt(r['fp32_p50_ms'])} | "
                     f"{_fmt(r['speedup'], 'x')} | {kept} | {smooth_quant(r)} | {_fmt(r.get('worst_layer'))} |")
    slow = [r for r in payload["rows"] if "failure" not in r and r.get("speedup") is not None and r["speedup"] < 1]
    if slow:
        lines += ["", "## INT8 slower than the same runtime's FP32: where the graph leaves the fast path", "",
                  "From each engine's runtime record (report.json `runtime`): LiteRT's XNNPACK partitions and the "
                  "operators it left to TFLite's built-in kernels (each boundary a hand-over between XNNPACK and the "
                  "interpreter; the built-in INT8 kernels run on one thread); ONNX Runtime's optimized graph: its "
                  "integer kernels, the Q/DQ nodes it kept and the float operators between them (each one a "
                  "dequantize, a float op and a quantize where FP32 runs one fused op).", "",
                  "| architecture | target | INT8 p50 ms | FP32 p50 ms | INT8 engine | FP32 engine |",
                  "|---|---|---|---|---|---|"]
        for r in slow:
            lines.append(f"| {labels.get(r['arch'], r['arch'])} | {r['target']} | {_fmt(r['int8_p50_ms'])} | "
                         f"{_fmt(r['fp32_p50_ms'])} | {_fmt(r.get('runtime_note'))} | {_fmt(r.get('fp32_runtime_note'))} |")
    lines += ["", "## Per architecture", "",
              "| architecture | GMACs | run s | whole s | FP32 SQNR dB (OpenVINO / ORT / TFLite) | explained |",
              "|---|---|---|---|---|---|"]
    for a in payload["architectures"]:
        fp32 = a.get("fp32_sqnr_db") or {}
        lines.append(f"| {a['label']} | {_fmt(a.get('gmacs'))} | {_fmt(a.get('run_seconds'))} | {a['seconds']} | "
                     f"{' / '.join(_fmt(fp32.get(k)) for k in ('openvino-fp32', 'onnxruntime-fp32', 'tflite-fp32'))} | "
                     f"{'yes' if a.get('explained') else _fmt(a.get('explain_error'))} |")
    lines += ["", "## How", "", f"Command: `{payload['command']}`", "",
              "Runs and explanations: benchmarks/work/architectures/ARCH/run (report.md, explain.md). "
              "SQNR dB (eval): the report's output SQNR on the evaluation images; SQNR dB (explain): "
              "`compress explain` on images held out of the calibration split. 'FP32 with 40 dB input noise': "
              "the FP32 model's output SQNR when Gaussian noise 40 dB below the signal is added to its input, "
              "in torch: random BatchNorm CNNs amplify any small error (they are chaotic, trained networks are "
              "not), so their INT8 SQNR says little about a trained model's; read it against this figure. "
              "The latency figures do not depend on the weights. A FP32 row's SQNR says how "
              "exactly the runtime converts the model (none: identical logits). 'ops with INT8 input': of the "
              "op types a transformer keeps in float, how many take an input from a quantizer "
              "(quantize_ptq's int8_inputs metric).", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--vit", choices=("b16", "small"), default="b16",
                        help="vit_b_16, or the same structure at 4 layers, 6 heads, width 384")
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--images", type=int, default=100, help="evaluation (test) images")
    parser.add_argument("--explain-images", type=int, default=32)
    parser.add_argument("--bn-images", type=int, default=64)
    parser.add_argument("--latency-rounds", type=int, default=20)
    parser.add_argument("--latency-seconds", type=float, default=1.0, help="evaluation.latency_min_seconds")
    parser.add_argument("--sensitivity", action="store_true", help="explain's per-quantizer ranking (slow at 224)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="transformers: leave out the CNN-default and SmoothQuant-off branches")
    parser.add_argument("--reuse", action="store_true",
                        help="take an architecture's finished run and explanation from work/ (runs the others)")
    parser.add_argument("--keep-cache", action="store_true",
                        help="reuse the pass outputs of the previous run of this benchmark (same settings)")
    parser.add_argument("--smoke", action="store_true",
                        help="efficientnet_b0 and the small ViT, 32 calibration and 16 evaluation images")
    args = parser.parse_args()
    if args.smoke:
        args.archs, args.vit, args.calibration, args.images = "efficientnet_b0,vit", "small", 32, 16
        args.explain_images, args.bn_images, args.latency_rounds, args.latency_seconds = 8, 32, 4, 0.2
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(unknown)} (choose from {', '.join(ARCHS)})")
    require_modules("litert_torch", "ai_edge_litert", "torchvision")
    sys.path.insert(0, str(REPO))
    from compressor.environment import environment

    if not args.keep_cache:
        shutil.rmtree(CACHE, ignore_errors=True)
    bn_images = bn_calibration_images(args.bn_images)
    results = []
    for arch in archs:
        print(f"== {arch}", flush=True)
        results.append((args.reuse and reused(arch, args, bn_images)) or run_arch(arch, args, bn_images))
    rows = [r for res in results for r in rows_of(res)]
    architectures = []
    for res in results:
        entry = {k: res.get(k) for k in ("arch", "label", "seconds", "run_seconds", "noise_sqnr_db", "dropped", "reused",
                                         "explain_error")}
        entry["gmacs"] = round(res["macs"] / 1e9, 2) if res.get("macs") else None
        if "report" in res:
            by = {r["name"]: r for r in res["report"]["results"]}
            entry["fp32_sqnr_db"] = {k: _round(by[k].get("output_sqnr_db")) for k in
                                     ("openvino-fp32", "onnxruntime-fp32", "tflite-fp32") if k in by}
            entry["failures"] = res["report"].get("failures", [])
            entry["timing_load"] = res["report"].get("timing_load")
            entry["run"] = str((WORK / res["arch"] / "run").relative_to(REPO))
        entry["explained"] = bool(res.get("explain"))
        if "error" in res:
            entry["error"] = res["error"]
        architectures.append(entry)
    env = environment(2)
    command = " ".join(["python", *sys.argv])
    for a in architectures:
        a.update(cpu=env["cpu"], isa_flags=env["isa_flags"], command=command)
    kept = earlier(archs, args)
    payload = {"command": command, "environment": env, "settings": {k: v for k, v in vars(args).items()},
               "rows": kept["rows"] + rows, "architectures": kept["architectures"] + architectures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "report.json", json.dumps(payload, indent=1, default=str) + "\n")
    write_text(RESULTS / "report.md", markdown(payload))
    print(scrub(markdown(payload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
