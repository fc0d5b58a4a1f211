"""``compress tune``: the fastest engine that keeps a given accuracy, found and proven on this machine.

1. A search space from what runs here and what the device allows (devices.py): targets x
   precisions (fp32, bf16 where the device has it, int8) x quantization settings (calibration
   method, preset, per-channel, the accuracy-budget mode of quantize_ptq).
2. One run of the pass manager builds every candidate as a branch of one recipe (the pass cache
   keeps each quantization, so an interrupted tune resumes where it stopped); ``--budget-min``
   stops starting new candidates once the time is spent.
3. Before any timing, each engine's top-1 on validation images held out of the training split
   (never the test split, never calibration images) is compared with the source's, image by image;
   only candidates whose drop has an upper confidence bound (:mod:`compressor.bound`, 95 %) within
   ``--max-drop`` are kept (see :class:`Screen`: a first slice ranks them and drops those over the
   budget with high confidence; the count of images follows the budget and the disagreement seen).
4. The survivors and the source are measured in one interleaved session on the test split (the
   run's report.md); tune.md gives the Pareto front of top-1 against batch-1 p50, the chosen
   engine (the fastest survivor; survivors within TIE_MARGIN of it tie, and the higher validation
   top-1 wins), its test top-1, and why each other candidate lost; tuned.yaml
   rebuilds the chosen engine exactly (same device, same settings) for CI to gate.
5. Threads: the engines on the Pareto front are timed again at 1 thread up to all cores, in one
   interleaved session of their own; the chosen engine runs at its fastest thread count, which
   tuned.yaml pins (``evaluation.threads``). Batch size is not searched: the objective is batch-1
   latency, and the accuracy pass's batch does not change an engine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .bound import (DEFAULT_CONFIDENCE, IMAGES_CAP, DropBound, fixed_count_problem, images_cap, images_needed,
                    paired, too_few_line)
from .devices import Device
from .evaluate import ResultRow, accuracy, figure_ms
from .measure import p50_at_threads
from .registry import get_target
from .run_dir import engines_of_run
from .staging import atomic_write, json_text

log = logging.getLogger(__name__)

TARGETS = ("openvino", "onnxruntime", "tflite", "executorch", "tensorrt")
"""the targets a tune considers (--targets picks among them)"""
VALIDATION_BATCH = 100
SLICE_IMAGES = 256
"""the validation images every candidate runs on first: they rank the candidates and drop those over
the budget with high confidence (the lower bound of the drop); the survivors run on all of them"""
TIE_MARGIN = 0.03
"""batch-1 p50s within 3 % of the fastest survivor's are a tie: with the warm blocks of
evaluate.latency, two copies of the real MobileNetV2's TFLite INT8 file read at most 2.3 % apart over
5 sessions (benchmarks/results/timing_mobilenetv2; ONNX Runtime copies can still differ more, from an
instance's own state). A tie goes to the higher validation top-1, then to the cheaper candidate
(search_space's order)."""
QUICK = {"warmup": 3, "latency_runs": 30, "latency_min_seconds": 0.2, "latency_rounds": 3, "throughput_batch": 16,
         "throughput_seconds": 0.2}
"""--quick: short timing for a first look (noisier figures)"""


@dataclass
class Candidate:
    name: str  # the branch name (engine names start with it)
    target: str
    precision: str
    what: str
    passes: list[Any] = field(default_factory=list)
    target_step: Any = None
    fused: bool | None = None
    """built after the ``fuse`` pass (batch norm folded into the convs in torch). None: search_space
    decides (every torch-input candidate but TFLite's). TFLite INT8 is tried both ways: litert-torch
    folds batch norm itself, and which graph its quantizer makes faster depends on the model (the
    fused one ran 1 % slower on ResNet-50, the unfused one 9 % slower on MobileNetV2)"""

    def chain(self) -> list[Any]:
        return ["fuse", *self.passes] if self.fused else list(self.passes)


def search_space(device: Device, input_form: str, max_drop: float,
                 only: tuple[str, ...] | None = None) -> tuple[list[Candidate], list[dict[str, str]]]:
    """The candidates for ``device`` and an input of ``input_form`` (torch or onnx), cheapest
    first, and what was left out and why."""
    out: list[Candidate] = []
    left_out: list[dict[str, str]] = []
    wanted = [t for t in TARGETS if only is None or t in only]
    for t in wanted:
        if t not in device.targets:
            left_out.append({"what": t, "why": f"device {device.name} does not run {t} engines"})
            continue
        avail = get_target(t).availability()
        if not avail.ok:
            left_out.append({"what": t, "why": f"{t} cannot build here: {avail.reason}"})
            continue
        if t in ("tflite", "executorch") and input_form == "onnx":
            left_out.append({"what": t, "why": f"{t} takes a torch model, and the input is ONNX"})
            continue
        own = getattr(get_target(t), "tune_candidates", None)
        if own is not None:  # the target's own list (so far executorch's; the others are listed below)
            out.extend(Candidate(c["name"], t, c["precision"], c["what"], [], {t: c["config"]})
                       for c in own(max_drop))
            continue
        if t == "openvino":
            ov = {"openvino": {"precision_hint": "f32"}}
            out.append(Candidate("ov_fp32", t, "fp32", "OpenVINO FP32", [], ov))
            if device.native_bf16:
                out.append(Candidate("ov_bf16", t, "bf16", "OpenVINO, inference precision bf16", [],
                                     {"openvino": {"precision_hint": "bf16"}}))
            else:
                left_out.append({"what": "OpenVINO bf16", "why": f"device {device.name} has no native bf16 "
                                 "(AVX512-BF16 / AMX): OpenVINO would run f32"})
            for preset, method in (("performance", "minmax"), ("performance", "mean_minmax"), ("mixed", "minmax")):
                out.append(Candidate(f"ov_int8_{preset[:4]}_{method}", t, "int8",
                                     f"NNCF INT8 ({preset} preset, {method} ranges)",
                                     [{"quantize_ptq": {"backend": "openvino", "preset": preset, "calibration": method}}],
                                     ov))
            out.append(Candidate("ov_int8_budget", t, "int8",
                                 f"NNCF INT8, sensitive layers kept in float (max_drop {max_drop} on validation images)",
                                 [{"quantize_ptq": {"backend": "openvino", "max_drop": max_drop}}], ov))
            if device.native_bf16:
                out.append(Candidate("ov_int8_bf16", t, "int8", "NNCF INT8, float layers in bf16",
                                     [{"quantize_ptq": {"backend": "openvino"}}],
                                     {"openvino": {"precision_hint": "bf16"}}))
        elif t == "onnxruntime":
            export = [] if input_form == "onnx" else ["export_onnx"]
            # the pass manager converts to ONNX for the target itself
            out.append(Candidate("ort_fp32", t, "fp32", "ONNX Runtime FP32", [], "onnxruntime"))
            for method, per_channel in (("minmax", True), ("minmax", False), ("entropy", True), ("percentile", True)):
                out.append(Candidate(
                    f"ort_int8_{method}_{'pc' if per_channel else 'pt'}", t, "int8",
                    f"ONNX Runtime static INT8 ({method}, per-{'channel' if per_channel else 'tensor'} weights)",
                    [*export, {"quantize_ptq": {"backend": "onnxruntime", "calibration": method,
                                                "per_channel": per_channel}}], "onnxruntime"))
            out.append(Candidate("ort_int8_budget", t, "int8",
                                 f"ONNX Runtime static INT8, sensitive layers kept in float (max_drop {max_drop})",
                                 [*export, {"quantize_ptq": {"backend": "onnxruntime", "max_drop": max_drop}}],
                                 "onnxruntime"))
        elif t == "tflite":
            out.append(Candidate("tfl_fp32", t, "fp32", "LiteRT/TFLite FP32 (XNNPACK)", [],
                                 {"tflite": {"quantization": "none"}}))
            out.append(Candidate("tfl_int8", t, "int8", "LiteRT/TFLite INT8 (PT2E, XNNPACK)", [],
                                 {"tflite": {"quantization": "int8"}}))
            out.append(Candidate("tfl_int8_fused", t, "int8", "LiteRT/TFLite INT8 (PT2E, XNNPACK) of the model after "
                                 "fuse (batch norm folded in torch)", [], {"tflite": {"quantization": "int8"}},
                                 fused=True))
        elif t == "tensorrt":
            left_out.append({"what": t, "why": "TensorRT engines are built and timed on the device; tune times "
                             "what runs here"})
    for c in out:
        if c.fused is None:
            c.fused = input_form == "torch" and c.target != "tflite"
    return out, left_out


def main_candidate(candidates: list[Candidate]) -> Candidate:
    """The candidate built in the main chain: one without passes of its own; unfused where any
    candidate is (branches start from the main chain's output, so a fused main chain would fuse them all)."""
    plain = [c for c in candidates if not c.passes]
    if any(not c.fused for c in candidates):
        plain = [c for c in plain if not c.fused]
    return plain[0]


def tune_recipe(candidates: list[Candidate], device: Device, data: dict[str, Any],
                evaluation: dict[str, Any]) -> dict[str, Any]:
    """One recipe: ``main_candidate`` in the main chain, every other one a branch."""
    first = main_candidate(candidates)
    rest = [c for c in candidates if c is not first]

    def branch_passes(c: Candidate) -> list[Any]:
        return list(c.passes) if c.fused and first.fused else c.chain()

    return {
        "name": "tune", "description": "compress tune: every candidate engine", "device": device.name,
        "data": data, "passes": first.chain(), "targets": [first.target_step],
        "branches": [{"name": c.name, "passes": branch_passes(c), "targets": [c.target_step]} for c in rest],
        "evaluation": evaluation,
    }


def tuned_recipe(c: Candidate, device: Device, data: dict[str, Any], max_drop: float,
                 model: str, threads: int | None = None, model_section: dict[str, Any] | None = None,
                 evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe that rebuilds candidate ``c``: ``data`` as the tune opened it (with its root, so that
    ``compress MODEL --recipe tuned.yaml`` needs nothing else), ``model_section`` a state dict's
    architecture and class count, ``evaluation`` the tune's timing settings (--quick) and
    ``threads`` the thread count it chose."""
    recipe = {
        "name": f"tuned_{c.name}", "description": f"compress tune's choice for {model} on {device.name}: {c.what}",
        **({"model": model_section} if model_section else {}),
        "device": device.name, "data": data, "passes": c.chain(), "targets": [c.target_step],
        "acceptance": {"max_top1_drop": max_drop},
    }
    evaluation = {**(evaluation or {}), **({"threads": threads} if threads is not None else {})}
    if evaluation:
        recipe["evaluation"] = evaluation
    return recipe


def _sqnr(db: float | None) -> float:
    return float("inf") if db is None else db  # None: identical outputs


class Screen:
    """Pipeline.screen: an engine whose model files are the same bytes as an earlier candidate's is
    dropped (timing it twice would only measure noise); every other engine's drop against the source
    on validation images (training split, not calibration images) is judged by its upper confidence
    bound at ``confidence`` (:mod:`compressor.bound`): only an engine whose bound is within
    ``max_drop`` is kept for timing.

    In two stages. First a slice of SLICE_IMAGES validation images: each engine's disagreement with
    the source and output SQNR there rank the engines, and one whose *lower* confidence bound there is
    already over ``max_drop`` is dropped (over the budget with high confidence; the guarantee of a
    kept engine is untouched). Then the survivors, in rank order, run on the whole validation set.
    ``images``: a fixed count asked for, or None: what the bound needs at the disagreement the slice
    saw (at least what it needs with none, at least 500, at most 10,000). ``used`` is what the
    training split gave (at most the images calibration did not use)."""

    def __init__(self, max_drop: float, images: int | None, data_ref: list[Any],
                 confidence: float = DEFAULT_CONFIDENCE) -> None:
        self.max_drop, self.images, self.data_ref, self.confidence = max_drop, images, data_ref, confidence
        self.fixed = images is not None
        self.used: int | None = None
        self.rows: list[dict[str, Any]] = []
        self.source_top1: float | None = None

    def __call__(self, rows: list[ResultRow], result: Any) -> list[ResultRow]:
        data = self.data_ref[0]
        if self.images is None:
            self.images = validation_images_default(self.max_drop, self.confidence)
        x, labels = self._load(result.source, data, self.images)
        unique = self._unique(rows, result)
        source = next(r for r in unique if r.name == "source")
        reference = self._logits(source, x)
        pick = np.random.default_rng(0).permutation(len(labels))[:SLICE_IMAGES]
        ranked = sorted((self._slice(row, x[pick], labels[pick], reference[pick]) for row in unique
                         if row.name != "source"), key=lambda t: (t[1]["disagreement"], -_sqnr(t[1]["sqnr_db"])))
        survivors = [(row, first) for row, first in ranked if first["kept"]]
        wanted = self._wanted(survivors, x)
        if wanted > len(labels):
            x, labels = self._load(result.source, data, wanted)
            reference = self._logits(source, x)
        self.used = len(labels)
        self.source_top1 = 100.0 * float((reference.argmax(1) == labels).mean())
        judged: dict[int, tuple[int, ResultRow, dict[str, Any], DropBound]] = {}
        for rank, (row, first) in enumerate(ranked):
            if first["kept"]:
                judged[id(row)] = (rank, row, first, self._full(row, x, labels, reference, first, rank))
            else:
                self._record(row, first, rank, None, first["top1"])
        short = [k for k, (_, _, _, found) in judged.items() if found.short_of_images()]
        grow = min(max((judged[k][3].needed() or 0 for k in short), default=0), images_cap(x[0].nbytes))
        if short and not self.fixed and grow > len(labels):
            # not proven only for lack of images: judged again on as many as the bound needs
            x, labels = self._load(result.source, data, grow)
            if len(labels) > self.used:
                reference = self._logits(source, x)
                self.images = self.used = len(labels)
                self.source_top1 = 100.0 * float((reference.argmax(1) == labels).mean())
                for k in short:
                    rank, row, first, _ = judged[k]
                    self.rows = [r for r in self.rows if r["name"] != row.name]
                    judged[k] = (rank, row, first, self._full(row, x, labels, reference, first, rank))
        kept = [source, *(row for _, row, _, found in judged.values() if found.met)]
        order = {id(r): i for i, r in enumerate(rows)}
        return sorted(kept, key=lambda r: order[id(r)])

    def _load(self, source: Any, data: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
        from .fidelity.explain import held_out_images

        x, labels, self.where = held_out_images(source, data, count)
        if len(labels) < count:
            log.warning("tune: %d validation images asked for, but the validation images (%s) are only %d: the "
                        "budget is judged on %d", count, self.where, len(labels), len(labels))
        line = too_few_line("tune", self.max_drop, self.confidence, len(labels))
        if line:
            log.warning("%s", line)
        return x, labels

    @staticmethod
    def _logits(row: ResultRow, x: np.ndarray) -> np.ndarray:
        return accuracy(row.runner, x, np.zeros(len(x), np.int64), VALIDATION_BATCH, None)[4]

    def _slice(self, row: ResultRow, x: np.ndarray, labels: np.ndarray,
               reference: np.ndarray) -> tuple[ResultRow, dict[str, Any]]:
        """The first stage: disagreement with the source, output SQNR and the bounds of the drop on the slice."""
        from .bound import lower_bound
        from .fidelity.metrics import sqnr_db

        started = time.perf_counter()
        logits = self._logits(row, x)
        found = paired(reference.argmax(1) == labels, logits.argmax(1) == labels, confidence=self.confidence)
        low = lower_bound(found.images, found.lost, found.gained, self.confidence)
        sqnr = sqnr_db(reference, logits)
        differ = float((logits.argmax(1) != reference.argmax(1)).mean())
        first = {"images": found.images, "disagreement": round(differ, 4), "sqnr_db": None if sqnr is None else round(sqnr, 2), "drop": round(found.point, 2),
                 "drop_lower_bound": round(low, 4), "verdict": found, "kept": low <= self.max_drop,
                 "top1": 100.0 * float((logits.argmax(1) == labels).mean()),
                 "seconds": time.perf_counter() - started}
        if not first["kept"]:
            log.info("tune: %s over budget on the first %d images: %s, lower bound %.2f > %.2f", row.name,
                     found.images, found.describe(), low, self.max_drop)
        return row, first

    def _wanted(self, survivors: list[tuple[ResultRow, dict[str, Any]]], x: np.ndarray) -> int:
        """How many validation images the survivors need: the asked count, or what the bound needs at
        the largest disagreement the slice saw among survivors that more images could prove (at most
        IMAGES_CAP, and what fits in memory)."""
        have = len(x)
        if self.fixed or not survivors:
            return have
        needs = [needed for _, first in survivors if (needed := self._needs(first["verdict"])) is not None]
        self.images = int(min(max([have, *needs]), images_cap(x[0].nbytes)))
        return self.images

    def _needs(self, found: DropBound) -> int | None:
        return images_needed(self.max_drop, self.confidence, (found.lost + found.gained) / max(found.images, 1),
                             max(found.point, 0.0))

    def _full(self, row: ResultRow, x: np.ndarray, labels: np.ndarray, reference: np.ndarray, first: dict[str, Any],
              rank: int) -> DropBound:
        """The second stage: the drop on every validation image (kept when its bound meets the budget)."""
        started = time.perf_counter()
        logits = self._logits(row, x)
        found = paired(reference.argmax(1) == labels, logits.argmax(1) == labels, confidence=self.confidence,
                       budget=self.max_drop)
        first["seconds"] += time.perf_counter() - started
        self._record(row, first, rank, found, 100.0 * float((logits.argmax(1) == labels).mean()))
        log.info("tune: %s validation %s: %s", row.name, found.describe(), "kept" if found.met else "dropped")
        return found

    def _record(self, row: ResultRow, first: dict[str, Any], rank: int, found: DropBound | None, top1: float) -> None:
        """A row of tune.json's screen: the verdict on every image (or on the slice, where it stopped there)."""
        final = found or first["verdict"]
        self.rows.append({
            "name": row.name, "validation_top1": round(top1, 2), "drop": round(final.point, 2),
            "drop_bound": round(final.bound, 4),
            "images": final.images, "lost": final.lost, "gained": final.gained, "confidence": self.confidence,
            "kept": bool(found is not None and found.met), "stage": "all" if found is not None else "slice",
            "slice": {k: first[k] for k in ("images", "disagreement", "sqnr_db", "drop", "drop_lower_bound")},
            "rank": rank + 1, "seconds": round(first["seconds"], 2),
            **({"images_needed": found.needed()} if found is not None and found.short_of_images() else {})})

    def _unique(self, rows: list[ResultRow], result: Any) -> list[ResultRow]:
        """``rows`` without those whose engine's model files are byte-identical to an earlier row's and
        that its target loads alike (OpenVINO's bf16 inference precision runs the FP32 files
        differently); each dropped one recorded with ``duplicate_of``."""
        from .fingerprints import files_fingerprint, json_fingerprint

        engines = {str(e.path): e for e in result.engines}
        seen: dict[str, str] = {}
        unique = []
        for row in rows:
            engine = engines.get(row.engine) if row.name != "source" else None
            if engine is not None and engine.files:
                settings = engine.builder.load_settings() if engine.builder is not None else {}
                key = files_fingerprint(sorted(engine.files, key=lambda f: Path(f).name)) + json_fingerprint(
                    {"target": engine.target, **settings})
                if key in seen:
                    self.rows.append({"name": row.name, "kept": False, "duplicate_of": seen[key]})
                    log.info("tune: %s is byte-identical to %s: dropped", row.name, seen[key])
                    continue
                seen[key] = row.name
            unique.append(row)
        return unique


def screen_verdict(s: dict[str, Any], max_drop: float) -> str:
    """Why the screen dropped a candidate: over the budget on the first slice (its lower bound), over
    it on every image, or not proven (its upper bound over the budget; how many images would do)."""
    if s.get("stage") == "slice":
        return (f"over budget: validation drop {s['drop']:.2f} on the first {s['images']} images, lower confidence "
                f"bound {s['slice']['drop_lower_bound']:.2f} > {max_drop}")
    if "drop_bound" not in s:  # a screen row without the bound
        return f"over budget: validation top-1 {s['drop']:.2f} points below the source (> {max_drop})"
    more = f"; {s['images_needed']} images would prove it at this disagreement" if s.get("images_needed") else ""
    return (f"not proven within the budget: validation drop {s['drop']:.2f}, upper bound {s['drop_bound']:.2f} > "
            f"{max_drop} at {s['confidence']:.0%} on {s['images']} images{more}")


def proven_line(summary: dict[str, Any]) -> str:
    """What the chosen engine's validation says: its upper confidence bound, within the budget."""
    row = next((r for r in summary["candidates"] if r.get("engine") == (summary["chosen"] or {}).get("engine")), {})
    if row.get("validation_drop_bound") is None:
        return ""
    return (f" Proven on held-out validation images: drop {row['validation_drop']:.2f}, upper bound "
            f"{row['validation_drop_bound']:.2f} <= {summary['max_drop']} at "
            f"{summary['validation'].get('confidence', DEFAULT_CONFIDENCE):.0%} confidence "
            f"({row['validation_images']} images).")


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, top1, p50) points no other point beats on both (higher top-1, lower p50)."""
    front = []
    for name, top1, p50 in points:
        if not any((t >= top1 and p < p50) or (t > top1 and p <= p50) for n, t, p in points if n != name):
            front.append(name)
    return front


def summarise(report: dict[str, Any], candidates: list[Candidate], left_out: list[dict[str, str]], screen: Screen,
              device: Device, max_drop: float, seconds: float) -> dict[str, Any]:
    figure = (report.get("timing") or {}).get("figure", "loop")

    def p50(r: dict[str, Any]) -> float:  # the figure evaluation.latency_figure names: loop or paced
        return figure_ms(r, figure)

    by_engine = {}
    main = main_candidate(candidates)
    for e in report["engines"]:
        c = next((c for c in candidates if c is not main and e["name"].startswith(c.name + "-")), main)
        by_engine[e["name"]] = c
    results = {r["name"]: r for r in report["results"]}
    source = results["source"]
    measured = [r for n, r in results.items() if n != "source" and n in by_engine]
    screened = {s["name"]: s for s in screen.rows}
    fastest = min(measured, key=lambda r: p50(r)) if measured else None
    ties = [] if fastest is None else [r for r in measured
                                       if p50(r) <= (1 + TIE_MARGIN) * p50(fastest)]
    order = {c.name: i for i, c in enumerate(candidates)}

    def val_top1(r: dict[str, Any]) -> float:
        return float((screened.get(r["name"]) or {}).get("validation_top1") or 0.0)

    chosen = max(ties, key=lambda r: (val_top1(r), -order[by_engine[r["name"]].name])) if ties else None
    front = pareto([(r["name"], r["top1"], p50(r)) for r in [source, *measured]])
    rows = []
    for c in candidates:
        engine = next((n for n, cc in by_engine.items() if cc is c), None)
        row: dict[str, Any] = {"candidate": c.name, "what": c.what, "target": c.target, "precision": c.precision,
                               "engine": engine}
        r = results.get(engine) if engine else None
        s = screened.get(engine) if engine else None
        if s and "duplicate_of" not in s:
            row.update(validation_top1=s["validation_top1"], validation_drop=s["drop"],
                       validation_drop_bound=s.get("drop_bound"), validation_images=s.get("images"))
        if r is not None:
            row.update(test_top1=r["top1"], p50_ms=p50(r), speedup=r.get("speedup"),
                       pareto=r["name"] in front, speedup_reliable=r.get("speedup_reliable", True))
        if chosen is not None and r is chosen:
            row["verdict"] = "chosen: the fastest within the budget" if r is fastest else (
                f"chosen: within {TIE_MARGIN:.0%} of the fastest ({fastest['name']}, p50 "  # type: ignore[index]
                f"{p50(fastest):.3f} ms), the highest validation top-1 of those")  # type: ignore[index]
        elif r is not None and any(r is t for t in ties):
            lost = (f"but validation top-1 {val_top1(r):.2f} % against the chosen's {val_top1(chosen):.2f} %"  # type: ignore[arg-type]
                    if val_top1(r) < val_top1(chosen) else  # type: ignore[arg-type]
                    "same validation top-1; the chosen candidate comes first in the search order")
            row["verdict"] = (f"tied: p50 {p50(r):.3f} ms, within {TIE_MARGIN:.0%} of the fastest, "
                              f"{lost}")
        elif r is not None:
            row["verdict"] = (f"slower: p50 {p50(r):.3f} ms against the chosen "
                              f"{p50(chosen):.3f} ms")  # type: ignore[index]
        elif s is not None and "duplicate_of" in s:
            same = by_engine[s["duplicate_of"]].name if s["duplicate_of"] in by_engine else s["duplicate_of"]
            row.update(duplicate_of=same, verdict=f"dropped: its engine is byte-identical to {same}'s "
                       f"({s['duplicate_of']}), which stands for both")
        elif s is not None and not s["kept"]:
            row["verdict"] = screen_verdict(s, max_drop)
        elif c.name in report.get("skipped_branches", []):
            row["verdict"] = "not tried: --budget-min spent"
        else:
            why = next((f["reason"] for f in report.get("failures", [])
                        if f.get("step", "").startswith(f"branches[") and c.name in f.get("step", "")
                        or engine and engine in f.get("reason", "")), None)
            row["verdict"] = f"not built or not run: {why}" if why else "not built or not run (see report.md)"
        rows.append(row)
    load = report.get("timing_load") or {}
    return {
        "device": report.get("device"), "max_drop": max_drop, "seconds": round(seconds, 1),
        "validation": {"images": screen.images if screen.used is None else screen.used, "requested": screen.images,
                       "source_top1": screen.source_top1, "from": getattr(screen, "where", "training split, not calibration images"),
                       "confidence": screen.confidence, "slice_images": SLICE_IMAGES},
        "duplicates": [{"candidate": r["candidate"], "engine": r["engine"], "same_bytes_as": r["duplicate_of"]}
                       for r in rows if r.get("duplicate_of")],
        "source": {"top1": source["top1"], "p50_ms": p50(source)},
        "chosen": None if chosen is None else {
            "engine": chosen["name"], "test_top1": chosen["top1"], "test_drop": round(source["top1"] - chosen["top1"], 2),
            "p50_ms": p50(chosen), "speedup": chosen.get("speedup"),
            "candidate": by_engine[chosen["name"]].name},
        "pareto": front, "candidates": rows, "left_out": left_out,
        "latency_figure": figure, "paced_rate_hz": (report.get("timing") or {}).get("paced_rate_hz"),
        "timing_under_load": bool(load.get("under_load")), "load_reasons": load.get("reasons", []),
    }


def render(summary: dict[str, Any], command: str) -> str:
    ch = summary["chosen"]
    dev = summary["device"] or {}
    val = summary["validation"]
    vsrc = val["source_top1"]
    asked = f" (asked for {val['requested']}: all there are, {val.get('from')})" \
        if (val.get("requested") or 0) > (val["images"] or 0) else ""
    lines = ["# compress tune", "",
             f"- device: {dev.get('name')} (built and timed on {dev.get('host')}); budget: top-1 within "
             f"{summary['max_drop']} points of the source, met where the upper confidence bound of the drop at "
             f"{val.get('confidence', DEFAULT_CONFIDENCE):.0%} is, on {val['images']} validation images{asked} "
             f"(source {'-' if vsrc is None else format(vsrc, '.2f')}%), then measured on the test split",
             f"- command: `{command}`", f"- seconds: {summary['seconds']}", ""]
    figure = (f"requests {summary.get('paced_rate_hz') or 0:g} per second, the cores idle between them (paced)"
              if summary.get("latency_figure") == "paced" else "back-to-back calls (loop)")
    lines[-2:-2] = [f"- latency optimised: batch-1 p50 of {figure} (`evaluation.latency_figure`, `--latency-figure`)"]
    if summary["timing_under_load"]:
        lines += ["**Timing ran under load**: " + "; ".join(summary["load_reasons"]) + ". The choice may not hold "
                  "on a quiet machine.", ""]
    if ch:
        side = "below" if ch["test_drop"] >= 0 else "above"
        lines += [f"**Chosen: `{ch['engine']}`**: test top-1 {ch['test_top1']:.2f}% ({abs(ch['test_drop']):.2f} points "
                  f"{side} the source's {summary['source']['top1']:.2f}%), batch-1 p50 {ch['p50_ms']:.3f} ms, "
                  f"{ch['speedup']:.2f}x the source; rebuilt exactly by `tuned.yaml`." + proven_line(summary), ""]
    else:
        lines += ["**No candidate kept the budget.**", ""]
    lines += ["| candidate | what | validation top-1 % | drop | bound | images | test top-1 % | p50 ms | speedup | "
              "Pareto | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary["candidates"], key=lambda r: (r.get("p50_ms") is None, r.get("p50_ms") or 0)):
        f = (lambda k, d=2: "-" if r.get(k) is None else f"{r[k]:.{d}f}")
        lines.append(f"| {r['candidate']} | {r['what']} | {f('validation_top1')} | {f('validation_drop')} | "
                     f"{f('validation_drop_bound')} | {r.get('validation_images') or '-'} | {f('test_top1')} | {f('p50_ms', 3)} | {f('speedup')}x | {'yes' if r.get('pareto') else ''} | "
                     f"{r['verdict']} |")
    sweep = summary.get("threads")
    if sweep and sweep.get("rows"):
        counts = sweep["counts"]
        lines += ["", "Threads: batch-1 p50 ms of the Pareto-front engines at each thread count (one interleaved "
                  "session of its own" + (", **under load**" if (sweep.get("timing_load") or {}).get("under_load")
                                          else "") + "):", "",
                  "| engine | " + " | ".join(f"{n} thread(s)" for n in counts) + " | fastest |",
                  "|---|" + "---|" * len(counts) + "---|"]
        lines += [f"| {r['engine']} | " + " | ".join(f"{r['p50_ms'][str(n)]:.3f}" for n in counts)
                  + f" | {r['fastest_threads']} |" for r in sweep["rows"]]
        if ch and ch.get("threads"):
            lines += ["", f"The chosen engine runs at {ch['threads']} thread(s); tuned.yaml pins it."]
        if sweep.get("note"):
            lines += ["", sweep["note"] + "."]
    cl = summary.get("cluster")
    if cl:
        lines += ["", f"On a Ray cluster (`--cluster {cl['address']}`"
                  + (", a local instance for this command" if cl.get("started_local") else "")
                  + "): where each stage ran and how long it took:", "",
                  "| stage | node | worker pid | seconds |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['node']} ({s.get('ip', '-')}) | {s['pid']} | {s['seconds']:.1f} |"
                  for s in cl.get("stages", [])]
    if summary["left_out"]:
        lines += ["", "Left out of the search space:", ""]
        lines += [f"- {x['what']}: {x['why']}" for x in summary["left_out"]]
    lines += ["", "Every row's figures are in report.md (same directory): one interleaved timing session."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> bool:
    from .plots import pyplot, save

    plt = pyplot()
    rows = [r for r in summary["candidates"] if r.get("p50_ms") is not None]
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.scatter(r["p50_ms"], r["test_top1"], color="tab:red" if r.get("pareto") else "tab:gray", zorder=3)
        ax.annotate(r["candidate"], (r["p50_ms"], r["test_top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["p50_ms"])
    ax.plot([r["p50_ms"] for r in front], [r["test_top1"] for r in front], color="tab:red", lw=1)
    src = summary["source"]
    ax.axhline(src["top1"] - summary["max_drop"], ls="--", color="tab:blue", lw=0.8, label="source - max_drop")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 p50 ms (log)")
    ax.set_ylabel("test top-1 %")
    ax.set_title("compress tune: top-1 against latency (red: Pareto front)")
    ax.legend(fontsize=7)
    return save(fig, path)


def thread_counts(cores: int) -> list[int]:
    """The thread counts a sweep tries on ``cores`` cores: 1, half and all of them."""
    return sorted({1, max(1, cores // 2), cores})


def thread_sweep(engines: list[Any], summary: dict[str, Any], one: np.ndarray, cfg: Any,
                 counts: list[int], timer: Callable[..., tuple[dict, dict]] | None = None) -> dict[str, Any]:
    """Batch-1 p50 of every Pareto-front engine at each of ``counts`` threads (``p50_at_threads``;
    ``timer(names, counts, one, cfg)``: the same elsewhere, e.g. in a cluster's device session); the
    chosen engine's fastest count. Updates ``summary["chosen"]`` with ``threads`` (and that count's p50
    in this session)."""
    front = [r["engine"] for r in summary["candidates"] if r.get("pareto") and r.get("engine")]
    by_name = {e.name: e for e in engines if e.built}
    loaders = {name: (lambda n, e=by_name[name]: e.builder.load(e, threads=n)) for name in front if name in by_name}
    if not loaders:
        return {"counts": counts, "rows": [], "note": "no built engine on the Pareto front"}
    p50, load = p50_at_threads(loaders, counts, one, cfg) if timer is None else timer(list(loaders), counts, one, cfg)
    rows = [{"engine": name, "p50_ms": {str(n): round(p50[(name, n)], 4) for n in counts},
             "fastest_threads": min(counts, key=lambda n: p50[(name, n)])} for name in loaders]
    out: dict[str, Any] = {"counts": counts, "rows": rows, "timing_load": load}
    ch = summary.get("chosen")
    if ch and any(r["engine"] == ch["engine"] for r in rows):
        best = next(r for r in rows if r["engine"] == ch["engine"])["fastest_threads"]
        ch.update(threads=best, threads_p50_ms=round(p50[(ch["engine"], best)], 4))
        rival = min(p50, key=p50.get)
        if rival[0] != ch["engine"]:
            out["note"] = (f"{rival[0]} at {rival[1]} thread(s) read {p50[rival]:.3f} ms in this sweep, against "
                           f"the chosen engine's {p50[(ch['engine'], best)]:.3f} ms; the choice stands on the main "
                           f"session's timing")
    return out


def write_outputs(out_dir: Path, summary: dict[str, Any], tuned: dict[str, Any] | None, command: str) -> list[str]:
    atomic_write(out_dir / "tune.json", json_text(summary))
    atomic_write(out_dir / "tune.md", render(summary, command))
    written = ["tune.json", "tune.md"]
    if tuned is not None:
        atomic_write(out_dir / "tuned.yaml", "# rebuilds compress tune's chosen engine: compress MODEL --recipe "
                     "tuned.yaml\n" + yaml.safe_dump(tuned, sort_keys=False))
        written.append("tuned.yaml")
    if plot(summary, out_dir / "pareto.png"):
        written.append("pareto.png")
    return written


def chosen_candidate(summary: dict[str, Any], candidates: list[Candidate]) -> Candidate | None:
    if not summary["chosen"]:
        return None
    return next(c for c in candidates if c.name == summary["chosen"]["candidate"])


def validation_images_default(max_drop: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The validation images a tune starts from: what the bound needs to prove ``max_drop`` with no
    disagreement (0.5 points at 95 %: 736), at least 500, at most IMAGES_CAP; the screen adds what the
    disagreement it sees on its first slice needs."""
    return int(np.clip(images_needed(max_drop, confidence) or IMAGES_CAP, 500, IMAGES_CAP))


def run_tune(model_path: Path, options: Any, *, max_drop: float, device_name: str | None, budget_min: float | None,
             validation_images: int | None, only: tuple[str, ...] | None, command: str,
             calibration_samples: int = 512, evaluation: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], Path, int]:
    """Build, screen and time every candidate; write the run (report.md, engines/) and tune.md,
    tune.json, pareto.png, tuned.yaml beside it. Returns (summary, output directory, exit code)."""
    from .artifact import Form
    from .devices import resolve
    from .errors import ConfigError
    from .job import cluster_for, guess_form, load_inputs, plan_job, run_and_write
    from .recipe import parse_recipe
    from .staging import run_tempdir

    problem = fixed_count_problem(max_drop, validation_images, DEFAULT_CONFIDENCE, count="--validation-images",
                                  limit="--max-drop")
    if problem:
        raise ConfigError(f"compress tune: {problem}")
    started = time.monotonic()
    device = resolve(device_name)
    form = "onnx" if guess_form(model_path) is Form.ONNX else "torch"
    candidates, left_out = search_space(device, form, max_drop, only)
    if not candidates:
        raise ConfigError("compress tune: nothing to try here: " + "; ".join(x["why"] for x in left_out))
    data = {"source": "folder", "calibration": {"split": "train", "samples": calibration_samples, "seed": 0},
            "evaluation": {"split": "test"}}
    recipe = parse_recipe(tune_recipe(candidates, device, data, evaluation or {}), source="compress tune")
    plan = plan_job(model_path, recipe, None, options)
    opened: list[Any] = []
    screen = Screen(max_drop, validation_images, opened)
    plan.pipeline.screen = screen
    if budget_min is not None:
        plan.pipeline.deadline = started + 60 * budget_min
    artifact, bundle = load_inputs(plan)
    opened.append(bundle)
    with cluster_for(options.cluster, plan) as cluster:
        with run_tempdir():
            job = run_and_write(plan, artifact, bundle)
        summary = summarise(job.report, candidates, left_out, screen, device, max_drop, time.monotonic() - started)
        if summary["chosen"] is not None:
            from .environment import default_threads
            from .fidelity.explain import held_out_images

            one = held_out_images(artifact, bundle, 1)[0]
            timer = None if cluster is None else (
                lambda names, counts, x, cfg: cluster.p50_at_threads(plan.pipeline.device_request, names, counts, x, cfg))
            summary["threads"] = thread_sweep(engines_of_run(job.out_dir, job.report), summary, one, plan.evaluation,
                                              thread_counts(default_threads()), timer=timer)
            summary["seconds"] = round(time.monotonic() - started, 1)
        if cluster is not None:
            summary["cluster"] = cluster.summary()
    chosen = chosen_candidate(summary, candidates)
    section = {k: v for k, v in (("arch", options.arch), ("num_classes", options.num_classes)) if v is not None}
    tuned = None if chosen is None else tuned_recipe(chosen, device, {**data, "root": bundle.config.root}, max_drop,
                                                     Path(model_path).name, summary["chosen"].get("threads"), section,
                                                     evaluation)
    write_outputs(job.out_dir, summary, tuned, command)
    return summary, job.out_dir, 0 if chosen is not None else 1
