"""report.json, report.md, the console table, and the recipe's acceptance checks."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bound import DEFAULT_CONFIDENCE
from .environment import environment
from .evaluate import figure_ms
from .fingerprints import file_fingerprint, json_fingerprint
from .staging import atomic_write, json_text

if TYPE_CHECKING:
    from .data import DataBundle
    from .records import RunResult
    from .recipe import AcceptanceConfig

REPORT_VERSION = 1
STAGE_ROW = re.compile(r"^stage\d+-")


def acceptance_checks(results: list[dict[str, Any]], limits: AcceptanceConfig,
                      figure: str = "loop") -> list[dict[str, Any]]:
    """One check per (engine, limit); the source row is the reference. The intermediate models of
    ``evaluation.stages`` (rows stageN-PASS) are reported, not gated: they are not shipped. Latency
    limits judge the p50 of ``figure`` (``evaluation.latency_figure``: loop or paced)."""
    source = next((r for r in results if r["name"] == "source"), None)
    checks = []
    for r in results:
        if r is source or STAGE_ROW.match(r["name"]):
            continue

        def add(metric: str, value: float, limit: float, ok: bool, unit: str = "") -> None:
            checks.append({"result": r["name"], "metric": metric, "value": round(value, 4), "limit": limit,
                           "unit": unit, "passed": bool(ok)})

        if limits.max_top1_drop is not None and source is not None:
            drop = source["top1"] - r["top1"]
            bound = r.get("top1_drop_bound")  # absent: a report or rows without per-image predictions
            judged = drop if bound is None else bound["bound"]
            add("top1_drop", drop, limits.max_top1_drop, judged <= limits.max_top1_drop + 1e-9, "points")
            if bound is not None:
                checks[-1].update(bound_check_fields(bound, limits.max_top1_drop))
        if limits.min_agreement is not None:
            add("agreement", r["agreement"], limits.min_agreement, r["agreement"] >= limits.min_agreement, "%")
        if limits.max_latency_ms is not None:
            p50 = figure_ms(r, figure)
            add("latency_p50", p50, limits.max_latency_ms, p50 <= limits.max_latency_ms, "ms")
        if limits.min_speedup is not None and source is not None:
            s = r["speedup"]
            add("speedup", s, limits.min_speedup, s >= limits.min_speedup, "x")
            if r.get("speedup_reliable") is False:
                checks[-1]["timed_under_load"] = True
        if limits.min_compression is not None and source is not None:
            c = r["compression"]
            add("compression", c, limits.min_compression, c >= limits.min_compression, "x")
    return checks


def bound_check_fields(bound: dict[str, Any], limit: float) -> dict[str, Any]:
    """What a top-1 drop check adds to its point value: the upper confidence bound it is judged by,
    the confidence, the images and, where the bound misses only for lack of images, how many would do."""
    from .bound import DropBound

    verdict = DropBound(point=bound["point"], bound=bound["bound"], images=bound["images"], lost=bound["lost"],
                        gained=bound["gained"], confidence=bound["confidence"], budget=limit)
    return {"bound": round(verdict.bound, 4), "confidence": verdict.confidence, "images": verdict.images,
            "lost": verdict.lost, "gained": verdict.gained,
            **({"images_needed": verdict.needed()} if verdict.short_of_images() else {})}


def drop_bounds(results: list[dict[str, Any]], measurements: list[Any], labels: Any, confidence: float) -> None:
    """Give every row but the source ``top1_drop_bound``: its drop against the source on the
    evaluation images, paired per image, with the upper confidence bound (compressor.bound)."""
    from .bound import from_predictions

    preds = {m.name: m.predictions for m in measurements if m.predictions is not None}
    if labels is None or "source" not in preds:
        return
    for r in results:
        if r["name"] != "source" and r["name"] in preds:
            r["top1_drop_bound"] = from_predictions(preds["source"], preds[r["name"]], labels,
                                                    confidence=confidence).to_json()


def budget_checks(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One check per quantize_ptq with ``max_drop``: its accuracy budget, met on the validation images
    or not (a budget no setting met fails the run, with the best model it found still built)."""
    checks = []
    for p in passes:
        b = (p.get("metrics") or {}).get("accuracy_budget")
        if not b:
            continue
        checks.append({"result": p["step"], "metric": "validation_top1_drop", "value": round(b["drop"], 4),
                       "limit": b["max_drop"], "unit": "points", "passed": bool(b["met"]),
                       "kept_in_float": len(b.get("kept_in_float") or []),
                       **{k: b[f] for k, f in (("bound", "drop_bound"), ("confidence", "confidence"),
                                               ("images", "validation_images"), ("images_needed", "images_needed"))
                          if f in b}})
    return checks


def build_report(
    result: RunResult,
    *,
    recipe_name: str,
    recipe: dict[str, Any] | None,
    model_path: str,
    data: DataBundle | None,
    limits: AcceptanceConfig | None,
    timings: dict[str, float] | None = None,
    world_size: int = 1,
    samples: dict[str, Any] | None = None,
    outputs: list[str] | None = None,
    built_in: Path | None = None,
    published_as: Path | None = None,
    device: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a finished run. ``samples`` (what compress compare reads), ``outputs`` (the
    names a run writes at the top of its directory) and the engine paths go in as the directory
    will hold them: files built in the staging directory ``built_in`` are named where they will
    live once it is renamed to ``published_as``."""

    def final(path: Any) -> str:
        if path is None or built_in is None or published_as is None:
            return path if path is None else str(path)
        try:
            return str(published_as / Path(path).relative_to(built_in))
        except ValueError:  # outside the staging directory (e.g. the source model file)
            return str(path)

    figure = (result.timing or {}).get("figure", "loop")
    results = [m.to_json() for m in result.measurements]
    for r in results:
        r["engine"] = final(r.get("engine"))
    engines = [e.to_json() for e in result.engines]
    for e in engines:
        e["files"] = [final(f) for f in e["files"]]
    drop_bounds(results, result.measurements, data.evaluation_labels() if data is not None else None,
                limits.confidence if limits is not None else DEFAULT_CONFIDENCE)
    source = next((r for r in results if r["name"] == "source"), None)
    for r in results:
        if source is not None:
            r["top1_delta"] = r["top1"] - source["top1"]
            # timed in another device's session (a cluster's): against the source timed there too
            there = next((q for q in results if q["name"] == f"source@{(r.get('timed_on') or {}).get('device')}"), source)
            r["speedup"] = figure_ms(there, figure) / figure_ms(r, figure)
            r["compression"] = source["size_bytes"] / r["size_bytes"] if r["size_bytes"] else None
    load = result.timing_load
    if load and load.get("under_load") and source is not None:
        for r in results:  # eager PyTorch suffers more from a busy machine than the runtimes do
            if r is not source and r["target"] != source["target"]:
                r["speedup_reliable"] = False
    if device is not None and not device["host_is_device"]:
        for r in results:  # timed here, for another device: not the device's latency
            r["measured_on"] = device["host"]
    checks = acceptance_checks(results, limits, figure) if (limits is not None and results) else []
    checks += budget_checks([r.to_json() for r in result.records]
                            + [{"step": e.builder.step if e.builder else e.name, "metrics": e.info}
                               for e in result.engines])
    data_info = None
    if data is not None:
        ev = data.config.evaluation
        data_info = {
            "source": data.config.source,
            "evaluation": {"split": ev.split, "images": len(result.measurements[0].predictions)
                           if result.measurements and result.measurements[0].predictions is not None else None,
                           "fingerprint": data.fingerprint("evaluation")},
            # asked for (data.calibration.samples) and used: a split smaller than asked gives all it has
            "calibration": {"split": data.config.calibration.split,
                            "samples_requested": data.config.calibration.samples,
                            "samples_used": data.calibration_count(),
                            "per_class": data.calibration_per_class(),
                            **({"sweep": data.config.calibration.sweep} if data.config.calibration.sweep else {}),
                            "seed": data.config.calibration.seed, "fingerprint": data.fingerprint("calibration")},
            "classes": data.classes,
        }
    return {
        "report_version": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe_name,
        "recipe_config": recipe,
        "model": model_path,
        # the input shape every row was measured at, and where it came from: "model" (the file's own),
        # "recipe" (model.input_shape), "model.json" (beside the model) or "data" (the images' size)
        "model_input": {"shape": list(result.source.input_spec.shape),
                        "source": result.source.meta.get("input_shape_source")},
        # what compress compare checks before comparing two runs (model file bytes, recipe, data)
        "fingerprints": {
            "model": file_fingerprint(Path(model_path)),
            "recipe": json_fingerprint(recipe),
            "calibration": data.fingerprint("calibration") if data is not None else None,
            "evaluation_set": data.evaluation_fingerprint() if data is not None else None,
        },
        "units": {"top1": "percent", "top5": "percent", "agreement": "percent", "latency_ms": "milliseconds",
                  "throughput_ips": "images/second", "size_bytes": "bytes"},
        "environment": environment(result.threads),
        "device": device,
        "timing_load": load,
        "timing": result.timing,
        "skipped_branches": result.skipped_branches,
        **({"cluster": {**result.cluster, "timing_sessions": result.sessions}} if result.cluster else {}),
        "data": data_info,
        "passes": [r.to_json() for r in result.records],
        "engines": engines,
        "failures": [f.to_json() for f in result.failures],
        "results": results,
        "acceptance": {"checks": checks, "passed": all(c["passed"] for c in checks)},
        "timings_s": timings or {},
        "world_size": world_size,
        "samples": samples or {},
        "outputs": outputs or [],
    }


def device_line(dev: dict[str, Any]) -> str:
    """``x86-avx2 (asked: x86-avx2): 7-bit weights (reduce_range), NNCF overflow_fix first_layer, no bf16; built on x86-amx``"""
    asked = "" if dev["requested"] == dev["name"] else f" (asked: {dev['requested']})"
    return (f"{dev['name']}{asked}: {'7-bit weights (reduce_range)' if dev['reduce_range'] else '8-bit weights'}, "
            f"NNCF overflow_fix {dev['overflow_fix']}, {'native bf16' if dev['native_bf16'] else 'no bf16'}; "
            f"{'this machine' if dev['host_is_device'] else 'built on a ' + dev['host'] + ' machine'}")


def timing_line(timing: dict[str, Any] | None) -> str:
    """The paragraph under the results table that says how latency was timed."""
    if not timing:  # reports written before the timing block
        return "Latency is batch 1 after warm-up, in rounds interleaved over all rows."
    paced = (f"; paced p50: requests arriving {timing['paced_rate_hz']:g} per second, the cores idle between them "
             f"({timing['paced_runs']} per row)" if timing.get("paced_rate_hz") else "")
    return (f"Latency is batch 1: p50/p90/p99 over {timing['loop']}{paced}. Speedups and latency limits judge the "
            f"{'paced' if timing['figure'] == 'paced' else 'back-to-back'} p50 (`evaluation.latency_figure`). ")


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def result_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        lat = r["latency_ms"]
        rows.append([
            r["name"], r["target"], r["precision"], _fmt(r["top1"]), _fmt(r["top5"]), _fmt(r["agreement"]),
            _fmt(r.get("top1_delta"), 2), _fmt(lat["p50"], 3), _fmt(lat["p90"], 3), _fmt(lat["p99"], 3),
            _fmt((r.get("paced_latency_ms") or {}).get("p50"), 3),
            f"{_fmt(r.get('speedup'))}x" + (" (load)" if r.get("speedup_reliable") is False else ""),
            _fmt(r["throughput_ips"], 0), f"{r['size_bytes'] / 1e6:.2f}",
            f"{_fmt(r.get('compression'))}x", _fmt(r.get("output_sqnr_db"), 1),
        ])
    return rows


RESULT_HEADER = ["name", "target", "precision", "top-1 %", "top-5 %", "agree %", "Δtop-1", "p50 ms", "p90 ms",
                 "p99 ms", "paced p50 ms", "speedup", "img/s", "size MB", "smaller", "SQNR dB"]


INPUT_SHAPE_SOURCES = {"model": "the model file", "recipe": "the recipe's model.input_shape",
                       "model.json": "the model.json beside the model", "data": "the data's image size"}


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# compressor report: {report['recipe']}", ""]
    lines.append(f"- model: `{report['model']}`")
    if report.get("model_input"):  # reports written before model_input have none
        mi = report["model_input"]
        lines.append(f"- input shape: {mi['shape']} (from {INPUT_SHAPE_SOURCES.get(mi['source'], mi['source'])})")
    if report["data"]:
        d = report["data"]
        cal = d["calibration"]
        used = cal.get("samples_used", cal.get("samples"))  # "samples": reports written before samples_used
        lines.append(f"- data: {d['source']}, evaluation on {d['evaluation']['images']} images of split "
                     f"`{d['evaluation']['split']}`, calibration {used} images of "
                     f"`{cal['split']}` (seed {cal['seed']})")
        if cal.get("samples_requested") is not None and used is not None and used < cal["samples_requested"]:
            lines.append(f"- **warning**: data.calibration.samples asks for {cal['samples_requested']} images, but "
                         f"split `{cal['split']}` has only {used}: calibrated on {used}")
    lines.append(f"- machine: {env['cpu']}, ISA {', '.join(env['isa_flags']) or '-'}; "
                 f"{env['threads']} threads for every runtime")
    dev = report.get("device")
    if dev:
        lines.append(f"- device the engines are for: {device_line(dev)}")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v != "absent")
    lines.append(f"- versions: {versions}")
    lines.append(f"- created: {report['created']}")
    lines += ["", "## Results", ""]
    if report["results"]:
        batch = report["results"][0].get("throughput_batch")
        header = [h if h != "img/s" else f"img/s @{batch}" for h in RESULT_HEADER]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in result_rows(report):
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(timing_line(report.get("timing")))
        lines.append("Speedup is the source's p50 over the row's p50; "
                     "agreement is top-1 agreement with the source model; `smaller` is source file size over "
                     "engine size; SQNR is the row's logits against the source's on the same images "
                     "(10 log10 of signal over error energy; - where identical or for the source).")
        tl = report.get("timing_load")
        if tl and tl.get("under_load"):
            lines.append("")
            lines.append("**Timing ran under load** (" + "; ".join(tl["reasons"]) + "): the speedups marked `(load)` "
                         "compare rows that a busy machine slows unequally (PyTorch eager most); time again on a "
                         "quiet machine before trusting them.")
        cl = report.get("cluster")
        if cl:
            lines += ["", f"Built and timed on a Ray cluster (`--cluster {cl['address']}`"
                      + (", a local instance for this command" if cl.get("started_local") else "") + "): "
                      + "; ".join(f"rows for device {s['device']} timed on node {s['node']} ({s.get('ip', '-')}, "
                                  f"{s['cpu']}, nice {s.get('nice', '-')}), {len(s['engines'])} engine(s)"
                                  for s in cl.get("timing_sessions", []))
                      + ". Each row's `timed_on` in report.json names its node; the stages: `cluster.stages`."]
        if dev and not dev.get("host_is_device", True) and not cl:
            lines.append("")
            lines.append(f"**Latency was measured on this machine ({dev['host']}), not on the device the engines are "
                         f"for ({dev['name']}): the latency columns are the host's, not the device's.**")
    else:
        lines.append("No measurements (the recipe has no data section).")
    for f in report.get("failures", report.get("not_built", [])):
        state = "not built here" if f.get("unavailable", True) else "FAILED"
        lines.append(f"- **{f['target']}** (`{f.get('step', f.get('field'))}`): {state} — {f['reason']}")
    lines += ["", "## Passes", "", "| # | pass | forms | time s | cached | figures |", "|---|---|---|---|---|---|"]
    for p in report["passes"]:
        figures = json.dumps(p["metrics"], default=str)
        if len(figures) > 160:
            figures = figures[:157] + "..."
        lines.append(f"| {p['index']} | {p['name']} | {p['form_in']} → {p['form_out']} | {p['seconds']:.1f} | "
                     f"{'yes' if p['cached'] else 'no'} | `{figures}` |")
    curves = training_curves(report)
    if curves:
        lines += ["", "## Training", "", "Validation top-1 on images held out of the training split; seconds "
                  "since the pass's training started." + (" ![training curves](training.png)" if
                                                          "training.png" in report.get("outputs", []) else ""), ""]
        for name, run in curves:
            probe = run.get("probe") or {}
            probed = "; probe s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in probe["s_per_step"].items()) \
                if len(probe.get("s_per_step") or {}) > 1 else ""
            lines += [f"**{name}** ({run.get('device', 'cpu')}, {run.get('precision', 'fp32')}, "
                      f"{run.get('memory_format', 'contiguous')}, {run.get('seconds', 0):.0f} s{probed}):", "",
                      "| epoch | train loss | train top-1 % | val top-1 % | s |", "|---|---|---|---|---|"]
            for h in run["history"]:
                lines.append(f"| {h.get('epoch')} | {_fmt(h.get('train_loss'), 4)} | {_fmt(h.get('train_top1'))} | "
                             f"{_fmt(h.get('val_top1'))} | {_fmt(h.get('seconds'), 0)} |")
            lines.append("")
    for p in report["passes"]:
        lines += _calibration_sweep_lines(p) + _budget_lines(p)
    for e in report.get("engines", []):  # targets that quantize themselves (tflite int8)
        lines += _budget_lines({"step": e.get("step") or e["name"], "metrics": e.get("info") or {}})
    lines += ["", "## What each runtime used", ""]
    for r in report["results"]:
        rt = {k: v for k, v in r["runtime"].items() if k not in ("kernels",)}
        lines.append(f"- **{r['name']}**: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in rt.items()))
        if r["runtime"].get("kernels"):
            top = list(r["runtime"]["kernels"].items())[:6]
            lines.append("  - kernels: " + ", ".join(f"{k} ×{n}" for k, n in top))
    if report.get("serving"):  # evaluation.serving: from image bytes to class index (compressor/serving.py)
        from .serving import render_markdown as serving_markdown

        lines += serving_markdown(report["serving"])
    checks = report["acceptance"]["checks"]
    if checks:
        verdict = "passed" if report["acceptance"]["passed"] else "FAILED"
        lines += ["", f"## Acceptance: {verdict}", "", "| result | metric | value | limit | verdict |",
                  "|---|---|---|---|---|"]
        for c in sorted(checks, key=lambda c: c["passed"]):
            bound = (f" (upper bound {c['bound']} at {c['confidence']:.0%}, {c['images']} images)"
                     if c.get("bound") is not None else "")
            lines.append(f"| {c['result']} | {c['metric']} | {c['value']} {c['unit']}{bound} | {c['limit']} {c['unit']} | "
                         f"{'pass' if c['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


def training_curves(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, training record with a history) of every training pass: distill and quantize_qat's
    ``train``, each prune_structured step's ``finetune``."""
    out = []
    for p in report.get("passes", []):
        m = p.get("metrics") or {}
        if isinstance(m.get("train"), dict) and m["train"].get("history"):
            out.append((p["step"], m["train"]))
        for st in m.get("steps") or []:
            if isinstance(st, dict) and isinstance(st.get("finetune"), dict) and st["finetune"].get("history"):
                out.append((f"{p['step']} fine-tune {st.get('step')}", st["finetune"]))
    return out


def plot_training(report: dict[str, Any], path: Path) -> bool:
    """training.png: training loss and validation top-1 against epoch, one line per training pass."""
    curves = training_curves(report)
    if not curves:
        return False
    from .plots import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for name, run in curves:
        ep = [h.get("epoch") for h in run["history"]]
        a.plot(ep, [h.get("train_loss") for h in run["history"]], marker=".", label=name)
        b.plot(ep, [h.get("val_top1") for h in run["history"]], marker=".", label=name)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    b.set_xlabel("epoch")
    b.set_ylabel("validation top-1 %")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    b.legend(fontsize=7)
    return save(fig, path)


def _calibration_sweep_lines(p: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    sw = (p.get("metrics") or {}).get("calibration_sweep")
    if not sw:
        return lines
    lines += ["", f"## Calibration size of `{p['step']}`", "",
              f"Plain INT8 top-1 on {sw['validation_images']} validation images "
              + (f"({sw['validation_from']}) " if sw.get("validation_from") else
                 f"of split '{sw['validation_split']}' that no size calibrates on (not the test split); ")
              + "float "
              f"{sw['float_top1']:.2f}%. The engine was built with {sw['built_with']} images.", "",
              "| calibration images | validation top-1 % | drop from float |", "|---|---|---|"]
    for r in sw["rows"]:
        lines.append(f"| {r['samples_used']}" + (f" (of {r['samples_requested']} asked)"
                     if r["samples_used"] != r["samples_requested"] else "") +
                     f" | {r['validation_top1']:.2f} | {sw['float_top1'] - r['validation_top1']:.2f} |")
    return lines


def _budget_lines(p: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    b = (p.get("metrics") or {}).get("accuracy_budget")
    if not b:
        return lines
    lines += ["", f"## Accuracy budget of `{p['step']}`", "",
              f"max_drop {b['max_drop']} points on {b['validation_images']} validation images "
              f"({b.get('validation_split') or 'held out of the training split'}; not the evaluated images): float {b['float_top1']:.2f}%, plain INT8 "
              f"{b['int8_top1_plain']:.2f}%, budgeted INT8 {b['int8_top1']:.2f}% (drop {b['drop']:.2f}"
              + (f", upper bound {b['drop_bound']:.2f} at {b['confidence']:.0%} confidence: {b['lost']} images lost, "
                 f"{b['gained']} gained" if "drop_bound" in b else "") + "); "
              f"{'met' if b['met'] else '**NOT MET**: the best setting found is built'}"
              + (f"; {b['images_needed']} images would prove it at this disagreement" if b.get("images_needed")
                 else "") + ". The test-split drop is each engine's Δtop-1 above.", ""]
    if b.get("too_few_images"):
        lines += [f"**{b['too_few_images']}**", ""]
    if b.get("retry"):
        lines += [f"NNCF's result missed the bound; it ran once more at max_drop {b['retry']['nncf_max_drop']} "
                  f"(kept: the {b['retry']['kept']}).", ""]
    kept = b.get("kept_layers") or []
    if kept:
        lines += ["| layer kept in float | source module | op | batch-1 latency cost ms |", "|---|---|---|---|"]
        for k in kept:
            lines.append(f"| {k.get('node')} | {k.get('source_module') or '-'} | {k.get('op_type') or '-'} | "
                         f"{_fmt(k.get('latency_cost_ms'), 3)} |")
    return lines


def write_report(report: dict[str, Any], out_dir: Path, *, explain: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """report.json and report.md; ``explain``: the run's explanation (explain.json's content), whose
    section goes at the end of report.md."""
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    atomic_write(json_path, json_text(report), what="report")
    md = render_markdown(report)
    if explain is not None:
        from .fidelity.render import render_markdown as explain_markdown

        md += "\n" + explain_markdown(explain) + "\n"
    atomic_write(md_path, md, what="report")
    return json_path, md_path


def print_table(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200)
    table = Table(title=f"compressor: {report['recipe']} ({report['environment']['threads']} threads)")
    for h in RESULT_HEADER:
        table.add_column(h, justify="left" if h in ("name", "target", "precision") else "right")
    for row in result_rows(report):
        table.add_row(*row)
    console.print(table)
    for f in report.get("failures", report.get("not_built", [])):
        state = "not built here" if f.get("unavailable", True) else "[red]FAILED[/]"
        console.print(f"[yellow]{f['target']}[/]: {state} — {f['reason']}")
    for c in report["acceptance"]["checks"]:
        if not c["passed"]:
            console.print(f"[red]acceptance failed[/]: {c['result']} {c['metric']} = {c['value']} {c['unit']} "
                          f"(limit {c['limit']})")
