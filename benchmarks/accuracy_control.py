"""Issue 24: OpenVINO's accuracy budget two ways, in one run: NNCF's ``quantize_with_accuracy_control``
(``accuracy_control: nncf``) against the keep-float loop every other backend runs
(``accuracy_control: keep_float``: layers ranked by the output NMSE left with each one's quantizers
bypassed, ``nncf.quantize`` with the top ones in the ignored scope, validated after each).

The real MobileNetV2 (../shared/models) meets any budget with plain INT8 (it keeps nothing in float,
benchmarks/results/accuracy_budget_mobilenetv2), so neither search would run on it. Here it carries one
planted outlier channel, FP32 unchanged: channel C of features.1's projection BatchNorm (no activation
after it, and its output goes only to features.2, which has no residual) scaled by 500, and
features.2's expand convolution's weights for that channel divided by 500. Per-tensor activation
quantizers on features.2's input then lose the other channels, as an outlier channel in a trained
network does. Both searches get the same budget (max_drop, validation images of the training split
calibration does not use) and the same calibration.

Figures per strategy: met (by the bound), validation drop plain -> budgeted, the test-split drop with
its two-sided 95 % interval, the layers kept in float and what each costs, batch-1 p50 from the run's
interleaved rounds, the pass's seconds and the number of models it validated.

    python benchmarks/accuracy_control.py            # about 10 minutes on 2 cores; run it alone
Writes benchmarks/results/accuracy_control/report.json and report.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, REPO, SHARED, require_modules, run_compress, scrub, write_text  # noqa: E402
from accuracy_budget import budget_of  # noqa: E402
from explain_real import cpu  # noqa: E402

require_modules("openvino", "nncf")
sys.path.insert(0, str(REPO))
from compressor.bound import drop_interval  # noqa: E402

MODEL = SHARED / "models" / "mobilenet_v2_cifar10.pt"
WORK = HERE / "work" / "accuracy_control_inputs"  # the planted model and recipe (the run: work/accuracy_control)
SCALE = 500.0
CHANNEL = 3
MAX_DROP = 1.0
STRATEGIES = [("nncf", "NNCF quantize_with_accuracy_control", "nncf_ac-openvino-int8", "branches[1]"),
              ("keep_float", "keep-float loop (shared with ONNX Runtime, TensorRT)", "keep_float-openvino-int8",
               "branches[2]")]


def planted_model() -> Path:
    """The MobileNetV2 with one outlier channel (FP32 unchanged: checked on random inputs), and its json."""
    import torch

    dest = WORK / "mobilenet_v2_planted.pt"
    if dest.is_file():
        return dest
    WORK.mkdir(parents=True, exist_ok=True)
    model = torch.load(MODEL, weights_only=False).eval()
    planted = copy.deepcopy(model)
    bn = planted.features[1].conv[2]  # features.1: dw conv-bn-relu6, then project conv (conv[1]) and its bn (conv[2])
    expand = planted.features[2].conv[0][0]
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(expand, torch.nn.Conv2d), (bn, expand)
    with torch.no_grad():
        bn.weight[CHANNEL] *= SCALE
        bn.bias[CHANNEL] *= SCALE
        expand.weight[:, CHANNEL] /= SCALE
        x = torch.randn(16, 3, 32, 32)
        torch.testing.assert_close(planted(x), model(x), rtol=1e-4, atol=1e-4)
    torch.save(planted, dest)
    dest.with_suffix(".json").write_text(MODEL.with_suffix(".json").read_text())
    return dest


def recipe() -> Path:
    text = f"""# MobileNetV2 with a planted outlier channel: OpenVINO INT8 (per-tensor activations, NNCF) plain, and
# within max_drop {MAX_DROP} by NNCF's accuracy control and by the shared keep-float loop
name: openvino_accuracy_control
data:
  source: cifar10
  calibration: {{split: train, samples: 512, seed: 0}}
  evaluation: {{split: test}}
targets:
  - openvino: {{precision_hint: f32}}
branches:
  - name: nncf
    passes: [{{quantize_ptq: {{backend: openvino}}}}]
    targets: [openvino]
  - name: nncf_ac
    passes: [{{quantize_ptq: {{backend: openvino, max_drop: {MAX_DROP}, accuracy_control: nncf}}}}]
    targets: [openvino]
  - name: keep_float
    passes: [{{quantize_ptq: {{backend: openvino, max_drop: {MAX_DROP}, accuracy_control: keep_float}}}}]
    targets: [openvino]
evaluation:
  latency_runs: 300
  latency_min_seconds: 1
  throughput_seconds: 1
"""
    path = WORK / "recipe.yaml"
    path.write_text(text)
    return path


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    model = planted_model()
    report = run_compress("accuracy_control", model, str(recipe()), "-q", "--no-cache")
    rows = {r["name"]: r for r in report["results"]}
    source, plain = rows["source"], rows["nncf-openvino-int8"]

    def test_drop(r: dict) -> dict:
        b = r["top1_drop_bound"]
        lo, hi = drop_interval(b["images"], b["lost"], b["gained"])
        return {"drop": round(b["point"], 3), "interval95": [round(lo, 3), round(hi, 3)], "lost": b["lost"],
                "gained": b["gained"]}

    out_rows = []
    for key, label, engine, where in STRATEGIES:
        b = budget_of(report, where, engine)
        step = next(k for k in report["timings_s"] if k.startswith(f"pass:{where}.") and k.endswith("quantize_ptq"))
        out_rows.append({
            "strategy": key, "label": label, "met": b["met"], "max_drop": b["max_drop"],
            "validation_images": b["validation_images"], "validation_drop_plain": round(b["drop_plain"], 3),
            "validation_drop": round(b["drop"], 3), "validation_drop_bound": b.get("drop_bound"),
            "test_plain": test_drop(plain), "test": test_drop(rows[engine]),
            "kept": [{"node": k["node"], "op_type": k.get("op_type"), "latency_cost_ms": k.get("latency_cost_ms")}
                     for k in b["kept_layers"]],
            "models_validated": len(b.get("tries", [])),
            "p50_plain_ms": round(plain["latency_ms"]["p50"], 4), "p50_ms": round(rows[engine]["latency_ms"]["p50"], 4),
            "pass_seconds": round(report["timings_s"][step], 1),
        })
    figures = {"benchmark": "accuracy_control", "issue": 24, "cpu": cpu(), "threads": 2,
               "model": "mobilenet_v2_cifar10.pt with one planted outlier channel (FP32 unchanged)",
               "planted": {"batchnorm": "features.1.conv.2", "next_conv": "features.2.conv.0.0", "channel": CHANNEL,
                           "scale": SCALE},
               "source_top1": source["top1"], "test_images": report["data"]["evaluation"]["images"],
               "plain_top1": plain["top1"], "rows": out_rows, "recipe": (WORK / "recipe.yaml").read_text(),
               "command": scrub(report["command"])}
    out = HERE / "results" / "accuracy_control"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(figures, indent=1) + "\n")
    write_text(out / "report.md", markdown(figures))
    print(f"wrote {out.relative_to(HERE.parent)}/report.md")
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _iv(t: dict) -> str:
    return f"{t['drop']:.2f} [{t['interval95'][0]:.2f}, {t['interval95'][1]:.2f}]"


def markdown(f: dict) -> str:
    lines = ["# OpenVINO INT8 within an accuracy budget: NNCF's accuracy control against the shared keep-float loop",
             "", f"CPU: {f['cpu']}, 2 threads. Model: {f['model']}: channel {f['planted']['channel']} of "
             f"{f['planted']['batchnorm']} scaled by {f['planted']['scale']:g}, {f['planted']['next_conv']}'s weights "
             f"for it divided by the same. Source top-1 {f['source_top1']:.2f} % on {f['test_images']:,} test images; "
             f"plain INT8 {f['plain_top1']:.2f} %. Both searches: max_drop {f['rows'][0]['max_drop']} points, met when "
             "the 95 % upper bound of the validation drop is within it (training-split images calibration did not "
             "use); the test drop is against the source with its two-sided 95 % interval; p50 is batch 1 from the "
             "run's interleaved rounds.", "",
             "| strategy | met | validation drop plain → budgeted (bound) | test drop plain → budgeted [95 %] | "
             "kept in float (ms each costs) | models validated | p50 ms plain → budgeted | pass s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in f["rows"]:
        kept = ", ".join(f"{k['node']} ({_ms(k['latency_cost_ms'])})" for k in r["kept"]) or "none"
        bound = "-" if r["validation_drop_bound"] is None else f"{r['validation_drop_bound']:.2f}"
        lines.append(f"| {r['label']} | {'yes' if r['met'] else '**no**'} | {r['validation_drop_plain']:.2f} → "
                     f"{r['validation_drop']:.2f} ({bound}; {r['validation_images']:,} images) | "
                     f"{_iv(r['test_plain'])} → "
                     f"{_iv(r['test'])} | {kept} | {r['models_validated']} | {r['p50_plain_ms']:.3f} → "
                     f"{r['p50_ms']:.3f} | {r['pass_seconds']} |")
    lines += ["", f"Command: `{f['command']}` (the model and recipe are written by "
              "`python benchmarks/accuracy_control.py`)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
