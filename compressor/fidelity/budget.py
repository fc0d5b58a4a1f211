"""Accuracy budgets (``max_drop``, top-1 points on validation images held out of calibration, never
the test split), met by keeping the most sensitive layers in float: the validation images and the
verdict (:class:`Budget`, judged by the one-sided confidence bound of :mod:`compressor.bound`), the
``accuracy_budget`` metrics block, the latency each kept layer costs, and the one loop
(:func:`keep_float_loop`) every backend's search runs: rank, keep the top layers in float, rebuild,
validate, stop when met.

* targets that quantize a torch model themselves (PT2E: tflite, executorch): :func:`keep_float_search`,
  sensitivity = the SQNR a layer loses against the float model (:func:`sqnr_loss_ranking`);
* ONNX (onnxruntime, tensorrt): :func:`compressor.passes._ptq.accuracy_budget.search_onnx`,
  sensitivity = the output NMSE left with one node in float, rebuilt by the backend's quantizer with
  ``nodes_to_exclude``;
* openvino: the same loop (:mod:`compressor.passes._ptq.openvino_nncf`), sensitivity = the output NMSE
  left with one layer's FakeQuantize nodes bypassed, rebuilt by ``nncf.quantize`` with the kept layers in
  its ignored scope; or, with ``accuracy_control: nncf``, NNCF's ``quantize_with_accuracy_control`` (its
  own ranking and loop), given the same :class:`Budget` and metrics block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bound import (DEFAULT_CONFIDENCE, IMAGES_CAP, DropBound, images_cap, paired, planned_images, too_few_line,
                     verdict_fields)
from .tapper import LayerInfo, Tapper

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """The validation images (preprocessed), their labels, the float model's per-image correctness
    on them, and the limits of the search. ``load(count)`` gives ``count`` validation images and
    labels (None: the set cannot grow); ``available`` how many the split holds."""

    max_drop: float
    x: np.ndarray
    labels: np.ndarray
    max_kept_layers: int
    threads: int
    layer_latency: bool = True
    confidence: float = DEFAULT_CONFIDENCE
    load: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    available: int = 0
    reference: Callable[[np.ndarray], np.ndarray] | None = None
    reference_correct: np.ndarray | None = None
    grown_from: int | None = None
    too_few: str | None = None
    """where the images the budget may use cannot prove it even with no disagreement: the line that says so"""
    where: str = "training split, images not used for calibration"
    """where the validation images come from (data.validation), in words"""

    def top1(self, logits: np.ndarray) -> float:
        return 100.0 * float((np.asarray(logits).argmax(1) == self.labels).mean())

    def set_reference(self, run: Callable[[np.ndarray], np.ndarray]) -> float:
        """The float model (``run``: images to logits) every verdict is paired with; its top-1."""
        self.reference = run
        self.reference_correct = np.asarray(run(self.x)).argmax(1) == self.labels
        return self.reference_top1

    @property
    def reference_top1(self) -> float:
        assert self.reference_correct is not None, "set_reference first"
        return 100.0 * float(self.reference_correct.mean())

    def judge(self, logits: np.ndarray) -> DropBound:
        """The drop of a model with these ``logits`` (on ``x``) against the float model's, with its bound."""
        assert self.reference_correct is not None, "set_reference first"
        return paired(self.reference_correct, np.asarray(logits).argmax(1) == self.labels,
                      confidence=self.confidence, budget=self.max_drop)

    def verdict(self, run: Callable[[np.ndarray], np.ndarray]) -> DropBound:
        """:meth:`judge` of the model ``run``; where its bound misses only for lack of images and the
        split has more, on a validation set grown to what the bound needs (then the float model too)."""
        found = self.judge(run(self.x))
        if found.short_of_images() and self._grow(found):
            found = self.judge(run(self.x))
        return found

    def holds(self, verdict: DropBound) -> bool:
        return bool(verdict.met)

    def current(self, verdict: DropBound, run: Callable[[np.ndarray], np.ndarray]) -> DropBound:
        """``verdict`` of the model ``run``, judged again if the validation set grew since."""
        return verdict if verdict.images == len(self.labels) else self.judge(run(self.x))

    def _grow(self, found: DropBound) -> bool:
        cap = images_cap(self.x[0].nbytes) if isinstance(self.x, np.ndarray) and len(self.x) else IMAGES_CAP
        count = planned_images(self.max_drop, self.confidence, self.available, cap=cap,
                               disagreement=(found.lost + found.gained) / found.images, point=found.point)
        if self.load is None or self.reference is None or count <= len(self.labels):
            return False
        log.info("accuracy budget: %s misses max_drop %.2f for lack of images: validating on %d images",
                 found.describe(), self.max_drop, count)
        self.grown_from = self.grown_from or len(self.labels)
        self.x, self.labels = self.load(count)
        self.set_reference(self.reference)
        return True


LEAST_IMAGES = 500
"""the fewest validation images a budget starts from when ``validation_samples`` is not given"""


def make_budget(data: Any, artifact: Any, *, max_drop: float, confidence: float, validation_samples: int | None,
                calibrated: int | None, max_kept_layers: int, threads: int, layer_latency: bool,
                what: str) -> Budget:
    """The budget of a pass or target (``what``) and its first validation images (training split,
    not calibration images): ``validation_samples`` of them, fixed, or (None) what the bound needs
    with no disagreement (at least LEAST_IMAGES), grown by :meth:`Budget.verdict` where a setting's
    bound needs more. Logs one line where the split cannot prove the budget even with no disagreement."""
    from ..streaming import in_memory

    size = tuple(artifact.input_spec.sample_shape[1:])
    available = data.validation_available(calibrated=calibrated)

    def load(count: int) -> tuple[Any, np.ndarray]:
        # streamed (an ImageSet sliced like an array: its first pass writes a decoded-image store that the
        # next ones read), or an array where they are few
        images = data.validation_images(size, artifact.preprocessing, count, calibrated=calibrated)
        return in_memory(images.preprocessed(artifact.preprocessing)), images.labels

    cap = IMAGES_CAP  # streamed: no memory bound on the count
    first = validation_samples or planned_images(max_drop, confidence, available, least=LEAST_IMAGES, cap=cap)
    x, labels = load(first)
    budget = Budget(max_drop=max_drop, x=x, labels=labels, max_kept_layers=max_kept_layers, threads=threads,
                    layer_latency=layer_latency, confidence=confidence,
                    load=None if validation_samples else load, available=available)
    reach = len(labels) if validation_samples else min(available, cap)
    budget.too_few = too_few_line(what, max_drop, confidence, reach)
    if hasattr(data, "validation_where"):
        budget.where = data.validation_where(calibrated)
    if budget.too_few:
        log.warning("%s", budget.too_few)
    return budget


def metrics_block(budget: Budget, *, method: str, plain: DropBound, final: DropBound, kept: list[dict[str, Any]], tries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The ``accuracy_budget`` block of the pass metrics (report.json passes[].metrics): the point
    drop (``drop``), its upper bound (``drop_bound``) at ``confidence``, and ``met`` by the bound.
    ``plain`` and ``final`` are judged on the final validation set."""
    met = budget.holds(final)
    if not met:
        log.warning("quantize_ptq: no setting met max_drop %.2f points at %.0f%% confidence: best validation %s "
                    "(%d layers kept in float)%s", budget.max_drop, 100 * budget.confidence, final.describe(),
                    len(kept), _needed(final))
    float_top1 = budget.reference_top1
    return {
        "max_drop": budget.max_drop,
        "validation_images": len(budget.labels),
        **({"validation_images_first": budget.grown_from} if budget.grown_from else {}),
        "validation_split": budget.where,
        "method": method,
        "float_top1": float_top1,
        "int8_top1_plain": float_top1 - plain.point,
        "int8_top1": float_top1 - final.point,
        "drop_plain": plain.point,
        "drop_plain_bound": round(plain.bound, 4),
        "drop": final.point,
        "met": met,
        **verdict_fields(final),
        **({"too_few_images": budget.too_few} if budget.too_few else {}),
        "kept_in_float": [k["node"] for k in kept],
        "kept_layers": kept,
        "tries": tries,
        **extra,
    }


def _needed(verdict: DropBound) -> str:
    return (f"; {verdict.needed()} validation images would prove it at this disagreement"
            if verdict.short_of_images() else "")


def try_row(verdict: DropBound, **fields: Any) -> dict[str, Any]:
    """One try of a search: what it kept and its verdict (the point drop, its bound, the images)."""
    return {**fields, "drop": verdict.point, "drop_bound": round(verdict.bound, 4), "images": verdict.images,
            "met": bool(verdict.met)}


def latency_costs(final: Any, variants: dict[str, Any], sample: np.ndarray) -> tuple[float, dict[str, float]]:
    """Batch-1 p50 latency (ms) of ``final`` and, for each kept layer, what keeping it costs: the
    final model's p50 less that of ``variants[layer]`` (the same model with that layer in INT8),
    timed in interleaved rounds. Closes the runners."""
    from ..evaluate import EvaluationConfig, latency

    cfg = EvaluationConfig(warmup=5, latency_runs=60, latency_min_seconds=0.4, latency_rounds=4)
    runners = [final, *variants.values()]
    try:
        p50 = [float(np.median(s)) for s in latency(runners, sample, cfg)]
    finally:
        for r in runners:
            r.close()
    return p50[0], {name: p50[0] - p for name, p in zip(variants, p50[1:])}


# ---------------------------------------------------------------------- the one keep-float loop


@dataclass
class Candidate:
    """A model built with some layers kept in float: what the target made (``model``), how to run it
    (images -> logits), and the fields its try row carries beside ``kept`` (e.g. the excluded nodes)."""

    model: Any
    run: Callable[[np.ndarray], np.ndarray]
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class KeepFloat:
    """What :func:`keep_float_loop` found: the chosen candidate, its verdict, the layers it keeps in
    float, every try, and each chosen layer's ranking score."""

    best: Candidate
    verdict: DropBound
    kept: list[str]
    tries: list[dict[str, Any]]
    scores: dict[str, float]


def keep_float_loop(budget: Budget, plain: Candidate, plain_verdict: DropBound, ranked: list[tuple[str, float]],
                    build: Callable[[list[str]], Candidate], *,
                    rerank: Callable[[Candidate], list[tuple[str, float]]] | None = None,
                    ties_to_kept: bool = False, noun: str | None = None) -> KeepFloat:
    """The one budget loop: keep the top 1, 2, ... layers of ``ranked`` ((layer, score), most
    sensitive first, one definition of sensitivity per backend) in float, ``build`` each setting
    (the target's keep-float rebuild), validate it against the budget, and stop when the drop holds
    or ``budget.max_kept_layers`` layers are kept. The best setting by point drop is chosen (a
    setting that holds always is; ``ties_to_kept``: an equal drop with layers kept beats plain INT8).
    ``rerank(candidate)``, where given: when a step gains less than half the way to the budget (other
    layers spoil it too), the layers not yet kept are ranked again on that step's model. ``noun``:
    what a layer is called in a log line per try (None: no log line)."""
    best, best_verdict, kept = plain, plain_verdict, []
    tries: list[dict[str, Any]] = []
    scores: dict[str, float] = {}
    if budget.holds(plain_verdict):
        return KeepFloat(best, best_verdict, kept, tries, scores)
    queue = list(ranked)
    layers: list[str] = []
    base_drop = plain_verdict.point
    while queue and len(layers) < budget.max_kept_layers:
        layer, scores[layer] = queue.pop(0)
        layers = [*layers, layer]
        candidate = build(layers)
        found = budget.verdict(candidate.run)
        met = budget.holds(found)
        tries.append(try_row(found, kept=layers, **candidate.fields, int8_top1=budget.reference_top1 - found.point))
        if noun is not None:
            log.info("accuracy budget: %d %s in float (%s): validation %s", len(layers), noun, ", ".join(layers),
                     found.describe())
        if found.point < best_verdict.point or (ties_to_kept and found.point == best_verdict.point and not kept) \
                or met:
            best, best_verdict, kept = candidate, found, layers
        if met:
            break
        if rerank is not None and base_drop - found.point < 0.5 * (base_drop - budget.max_drop):
            queue = rerank(candidate)
        base_drop = min(base_drop, found.point)
    return KeepFloat(best, best_verdict, kept, tries, scores)


def sqnr_loss_ranking(reference: Any, tapper: Tapper, x: np.ndarray) -> list[dict[str, Any]]:
    """Layers ranked by the SQNR each loses against the layer before it (the lowest of SQNR and
    channel SQNR, against the float model's taps ``reference`` on ``x``), most lost first; a layer's
    loss is measured from the lowest SQNR seen before it (60 dB at the start)."""
    from .explain import LayerStats, lowest_sqnr

    want, got = reference(x), tapper(x)
    ranking: list[dict[str, Any]] = []
    prev = 60.0
    for name in reference.plan.layers:
        if name not in got:
            continue
        acc = LayerStats()
        acc.add(want[name], got[name], None)
        low = lowest_sqnr(acc.result(None))
        low = 99.0 if low is None else low
        ranking.append({"layer": name, "sqnr_db": round(low, 2), "loss_db": round(max(0.0, prev - low), 2)})
        prev = min(prev, low)
    ranking.sort(key=lambda r: -r["loss_db"])
    return ranking


def keep_float_search(budget: Budget, module: Any, build: Callable[[tuple[str, ...]], Any], *,
                      runner: Callable[[Any], Any], tapper: Callable[[Any, list[LayerInfo]], Tapper],
                      method: str, runtime: str, op_type: str = "conv/linear") -> tuple[Any, dict[str, Any]]:
    """An accuracy budget met by keeping torch layers in float (targets that quantize a torch model
    themselves: PT2E): ``build(keep)`` makes a model with the modules ``keep`` unquantized (``()``:
    plain INT8), ``runner(model)`` runs it (a :class:`compressor.target_base.Runner`), ``tapper(model,
    reference layers)`` taps it. Plain INT8 first; where it misses, the layers are ranked by
    :func:`sqnr_loss_ranking` on validation images and kept by :func:`keep_float_loop`; the latency
    each kept layer costs is timed where ``budget.layer_latency``. Returns the best model and the
    ``accuracy_budget`` block (``op_type``: what the kept layers are called in it)."""
    import torch

    from .torch_tapper import TorchTapper

    def runs(model: Any) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            r = runner(model)
            try:
                return np.concatenate([r(x[i : i + 64]) for i in range(0, len(x), 64)])
            finally:
                r.close()
        return run

    def float_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([module(torch.from_numpy(x[i : i + 64])).numpy() for i in range(0, len(x), 64)])

    budget.set_reference(float_logits)
    plain_model = build(())
    plain = Candidate(plain_model, runs(plain_model))
    plain_verdict = budget.verdict(plain.run)
    ranking: list[dict[str, Any]] = []
    modules: dict[str, tuple[str, ...]] = {}

    def keep(layers: list[str]) -> tuple[str, ...]:
        return tuple(m for layer in layers for m in modules.get(layer, (layer,)))

    def rebuild(layers: list[str]) -> Candidate:
        model = build(keep(layers))
        return Candidate(model, runs(model))

    if not budget.holds(plain_verdict):
        ref = TorchTapper(module)
        modules = {layer.name: layer.modules or (layer.name,) for layer in ref.layers}
        tap = tapper(plain_model, ref.layers)
        try:
            ranking = sqnr_loss_ranking(ref, tap, budget.x[:64])
        finally:
            tap.close()
    found = keep_float_loop(budget, plain, plain_verdict, [(r["layer"], r["loss_db"]) for r in ranking], rebuild,
                            ties_to_kept=True)
    plain_verdict = budget.current(plain_verdict, plain.run)
    best_verdict = budget.current(found.verdict, found.best.run)
    rows = [{"node": layer, "source_module": layer, "op_type": op_type, "latency_cost_ms": None}
            for layer in found.kept]
    extra: dict[str, Any] = {"ranking": ranking}
    if found.kept and budget.layer_latency:
        variants = {}
        for layer in found.kept:
            others = keep([other for other in found.kept if other != layer])
            variants[layer] = runner(build(others) if others else plain_model)
        final_p50, costs = latency_costs(runner(found.best.model), variants, budget.x[:1])
        for r in rows:
            r["latency_cost_ms"] = round(costs[r["node"]], 4)
        extra["latency_ms"] = {"budgeted": round(final_p50, 4), "runtime": runtime, "threads": budget.threads}
    return found.best.model, metrics_block(budget, method=method, plain=plain_verdict, final=best_verdict,
                                           kept=rows, tries=found.tries, **extra)
