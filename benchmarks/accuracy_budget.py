"""Issue 12: quantization under an accuracy budget on a real model, beside plain INT8, same run.

Runs recipes/mobilenetv2_int8_budget.yaml (or --recipe) on the model and writes
benchmarks/results/accuracy_budget_MODEL/report.json + report.md: per backend, plain and budgeted
INT8: the validation drop (training-split images calibration did not use), the test-split drop
(full test split), the layers kept in float and what each costs at batch 1, and both engines'
batch-1 p50 from the run's interleaved timing.

    .venv/bin/python benchmarks/accuracy_budget.py mobilenetv2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, SHARED, run_compress, scrub, write_text  # noqa: E402
from explain_real import MODELS, cpu  # noqa: E402

# backend, plain engine, budgeted engine, where the budgeted engine's accuracy_budget block is
PAIRS = [("openvino", "nncf-openvino-int8", "nncf_budget-openvino-int8", "branches[1]"),
         ("onnxruntime", "ortq-onnxruntime-int8", "ortq_budget-onnxruntime-int8", "branches[3]"),
         ("tflite", "tflite-int8", "tflite-int8-2", "engine")]


def budget_of(report: dict, where: str, engine: str) -> dict:
    if where == "engine":
        return next(e for e in report["engines"] if e["name"] == engine)["info"]["accuracy_budget"]
    return next(p["metrics"]["accuracy_budget"] for p in report["passes"]
                if p["step"].startswith(where) and "accuracy_budget" in p["metrics"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--recipe", default="mobilenetv2_int8_budget")
    args = ap.parse_args()
    name = f"accuracy_budget_{args.model}"
    report = run_compress(name, SHARED / "models" / MODELS[args.model], args.recipe, "-q", "--no-cache")
    rows = {r["name"]: r for r in report["results"]}
    source = rows["source"]
    out_rows = []
    for backend, plain, budgeted, where in PAIRS:
        if plain not in rows or budgeted not in rows:
            continue
        b = budget_of(report, where, budgeted)
        out_rows.append({
            "backend": backend, "max_drop": b["max_drop"], "validation_images": b["validation_images"],
            "validation_drop_plain": round(b["drop_plain"], 3), "validation_drop": round(b["drop"], 3), "met": b["met"],
            "test_drop_plain": round(source["top1"] - rows[plain]["top1"], 3),
            "test_drop": round(source["top1"] - rows[budgeted]["top1"], 3),
            "kept": [(k.get("source_module") or k["node"], k.get("latency_cost_ms")) for k in b["kept_layers"]],
            "p50_plain_ms": round(rows[plain]["latency_ms"]["p50"], 4),
            "p50_budgeted_ms": round(rows[budgeted]["latency_ms"]["p50"], 4),
            "tries": len(b.get("tries", [])),
        })
    seconds = {k: round(v, 1) for k, v in report["timings_s"].items() if k.startswith(("pass:", "build:"))}
    figures = {"model": args.model, "cpu": cpu(), "threads": 2, "source_top1": source["top1"],
               "test_images": report["data"]["evaluation"]["images"], "rows": out_rows, "seconds": seconds,
               "command": scrub(report["command"])}
    out = HERE / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(figures, indent=1))
    md = [f"# INT8 under an accuracy budget: {args.model}", "",
          f"CPU: {figures['cpu']}, 2 threads. Source top-1 {source['top1']:.2f}% on {figures['test_images']} test "
          "images. Validation drops are on training-split images calibration did not use; test drops on the "
          "whole test split; latency is batch-1 p50 from the run's interleaved rounds.", "",
          "| backend | max_drop | validation drop plain → budgeted | met | test drop plain → budgeted | "
          "kept in float (ms each costs) | p50 ms plain → budgeted | tries |",
          "|---|---|---|---|---|---|---|---|"]
    for r in out_rows:
        kept = ", ".join(f"{n} ({'-' if c is None else f'{c:.3f}'})" for n, c in r["kept"]) or "none"
        md.append(f"| {r['backend']} | {r['max_drop']} | {r['validation_drop_plain']:.2f} → {r['validation_drop']:.2f} "
                  f"({r['validation_images']} images) | {'yes' if r['met'] else '**no**'} | {r['test_drop_plain']:.2f} → "
                  f"{r['test_drop']:.2f} | {kept} | {r['p50_plain_ms']:.3f} → {r['p50_budgeted_ms']:.3f} | {r['tries']} |")
    md += ["", "Seconds per step: " + ", ".join(f"`{k}` {v}" for k, v in seconds.items()), "",
           f"Command: `{figures['command']}`"]
    write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
