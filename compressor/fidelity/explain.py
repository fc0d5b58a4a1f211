"""Where accuracy is lost: per layer, per engine, against the float model the engine was made from;
per pass, against the source; and for quantized engines, which layer's quantizer costs most.

For every engine of a run, on N images held out of the calibration (training) split, never the
test split:

* **layers** (:mod:`compressor.fidelity.tapper`, each target's ``tapper``): each conv / linear layer's tap compared with the reference
  model's tensor for the same layer: SQNR (dB), channel SQNR (dB: each channel scaled to its own
  power first, so a per-tensor scale that an outlier channel blows up shows even when that channel
  carries most of the power), cosine similarity, max abs error; for quantized taps the calibrated
  range, the share of reference activations outside it and the share of it they use (drift);
* **sensitivity**: for engines whose graph can lose one quantizer (QDQ ONNX, OpenVINO
  FakeQuantize), the output SQNR with only that layer's activation quantizer removed, ranked by the
  dB it wins back;
* **stages**: agreement, top-1 on the held-out images and output SQNR after every pass of the chain
  and for every engine, so a loss is pinned to the pass that made it;
* **verdict**: the first layer below the SQNR threshold, the most sensitive layers, drift warnings,
  and layers where two engines of the same precision part by more than ``disagreement_db``.

The reference of an engine's layers is the last floating-point torch model of its lineage (the
source, or the fused / pruned / distilled model its quantization started from), so the layer
figures show what quantization and the backend did; the stages show what every pass did."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..artifact import Form, ModelArtifact
from ..errors import first_line
from ..evaluate import ExplainConfig
from ..registry import get_target
from .metrics import ZERO_SIGNAL_DB, channel_sqnr_db, cosine, sqnr_db, sqnr_from_sums
from .tapper import Quantizer, Tapper
from .torch_tapper import TorchTapper

log = logging.getLogger("compressor.explain")

DRIFT_MIN_VALUES = 1000  # activations a layer needs on the evaluation images before its drift is judged


@dataclass
class RangeUse:
    """How a layer's reference activations sit in its quantizer's range: the share outside it, and
    the share of the range their largest magnitude reaches."""

    outside: int = 0
    count: int = 0
    peak: float = 0.0

    def add(self, a: np.ndarray, q: Quantizer) -> None:
        if not a.size:
            return
        self.outside += int(((a < q.low) | (a > q.high)).sum())
        self.count += a.size
        self.peak = max(self.peak, float(np.abs(a).max()) / (max(abs(q.low), abs(q.high)) or 1.0))

    def result(self) -> dict[str, Any]:
        return {"outside_share": round(self.outside / self.count, 6) if self.count else None,
                "range_used": round(self.peak, 4)}


@dataclass
class LayerStats:
    """One layer's engine output against its reference, accumulated over batches."""

    sig: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    out2: float = 0.0
    max_err: float = 0.0
    ch_sig: np.ndarray | None = None
    ch_noise: np.ndarray | None = None
    ranges: RangeUse = field(default_factory=RangeUse)
    shape_error: str | None = None

    def add(self, ref: np.ndarray, out: np.ndarray, q: Quantizer | None) -> None:
        if ref.shape != out.shape:
            self.shape_error = f"shape {list(out.shape[1:])} against the reference's {list(ref.shape[1:])}"
            return
        r, o = ref.astype(np.float64), out.astype(np.float64)
        d = r - o
        self.sig += float((r * r).sum())
        self.noise += float((d * d).sum())
        self.dot += float((r * o).sum())
        self.out2 += float((o * o).sum())
        self.max_err = max(self.max_err, float(np.abs(d).max()) if d.size else 0.0)
        axes = tuple(i for i in range(r.ndim) if i != 1)
        cs, cn = (r * r).sum(axis=axes), (d * d).sum(axis=axes)
        self.ch_sig = cs if self.ch_sig is None else self.ch_sig + cs
        self.ch_noise = cn if self.ch_noise is None else self.ch_noise + cn
        if q is not None:
            self.ranges.add(r, q)

    def result(self, q: Quantizer | None) -> dict[str, Any]:
        if self.shape_error:
            return {"status": self.shape_error}
        db = sqnr_from_sums(self.sig, self.noise, zero_signal_db=ZERO_SIGNAL_DB)
        ch = channel_sqnr_db(self.ch_sig, self.ch_noise) if self.ch_sig is not None and self.ch_noise is not None \
            else None
        cos = cosine(self.dot, self.sig, self.out2)
        out = {
            # rounded as numpy rounds a float64 (the figures explain.json always had)
            "sqnr_db": None if db is None else (db if db == ZERO_SIGNAL_DB else round(np.float64(db), 2)),
            "channel_sqnr_db": None if ch is None else round(ch, 2),
            "cosine": None if cos is None else round(cos, 6),
            "max_abs_err": round(self.max_err, 6),
        }
        if q is not None:
            out["quantizer"] = {"low": round(q.low, 6), "high": round(q.high, 6)}
            out.update(self.ranges.result())
        return out


@dataclass
class EngineHandle:
    """An engine as explain sees it: its name, what it is, and how to read it."""

    name: str
    target: str
    precision: str
    lineage: list[dict[str, Any]]
    runner: Callable[[], Any]  # -> Runner (logits)
    tapper: Callable[[list[Any]], Tapper]  # (reference layers) -> Tapper
    note: str = ""


@dataclass
class Explanation:
    data: dict[str, Any]
    worst: dict[str, str] = field(default_factory=dict)  # engine -> one line about its worst layer


def _logits(runner: Any, x: np.ndarray, batch: int) -> np.ndarray:
    runner.prepare(batch)
    return np.concatenate([np.asarray(runner(x[i : i + batch]), np.float32) for i in range(0, len(x), batch)])


REFERENCE_RUNTIMES = {Form.ONNX: "onnxruntime", Form.OPENVINO: "openvino"}
"""the target (by registry name) whose runtime runs an intermediate artifact of each file form"""


def artifact_runner(art: ModelArtifact, threads: int) -> Any:
    """A runner of an artifact of any form: torch models eagerly, files on their reference runtime
    (:meth:`compressor.target_base.Target.reference_runner` of :data:`REFERENCE_RUNTIMES`)."""
    from ..evaluate import TorchRunner

    if art.form in REFERENCE_RUNTIMES:
        return get_target(REFERENCE_RUNTIMES[art.form]).reference_runner(art.path, threads=threads)
    return TorchRunner(art.torch_module(), threads=threads, fixed_batch=art.meta.get("fixed_batch"))


def _reference_for(engine: EngineHandle, stages: dict[str, ModelArtifact], source: ModelArtifact) -> ModelArtifact:
    """The last floating-point torch model of the engine's lineage that is at hand, else the source."""
    best = source
    for entry in engine.lineage:
        art = stages.get(entry.get("input_hash", ""))
        if art is not None and art.form is Form.TORCH and art.precision != "int8":
            best = art
    return best


def explain(source: ModelArtifact, engines: list[EngineHandle], x: np.ndarray, labels: np.ndarray, *,
            stages: list[tuple[str, str, ModelArtifact]], images_from: str, threads: int, cfg: ExplainConfig,
            drift_x: np.ndarray | None = None, drift_from: str = "",
            say: Callable[[str], None] = lambda _m: None) -> Explanation:
    """``stages``: (step, pass name, output artifact) of every pass in run order. ``drift_x``: evaluation
    images on which the reference's activations are checked against each quantizer's calibrated range."""
    started = time.perf_counter()
    bs = cfg.batch_size
    by_hash = {source.content_hash(): source, **{a.content_hash(): a for _, _, a in stages}}
    say("explain: source logits")
    src_runner = artifact_runner(source, threads)
    try:
        ref_logits = _logits(src_runner, x, bs)
    finally:
        src_runner.close()
    ref_pred = ref_logits.argmax(1)

    def row(label: str, kind: str, logits: np.ndarray, **extra: Any) -> dict[str, Any]:
        return {"step": label, "kind": kind, **extra,
                "top1": round(100.0 * float((logits.argmax(1) == labels).mean()), 2),
                "agreement": round(100.0 * float((logits.argmax(1) == ref_pred).mean()), 2),
                "output_sqnr_db": _round(sqnr_db(ref_logits, logits))}

    stage_rows = [row("source", "source", ref_logits, form=source.form.value, precision=source.precision)]
    for step, name, art in stages:
        say(f"explain: stage {step}")
        try:
            r = artifact_runner(art, threads)
            try:
                stage_rows.append(row(step, name, _logits(r, x, bs), form=art.form.value, precision=art.precision))
            finally:
                r.close()
        except Exception as exc:  # noqa: BLE001 - a stage that cannot run here is reported
            stage_rows.append({"step": step, "kind": name, "form": art.form.value,
                               "status": f"not run: {type(exc).__name__}: {first_line(exc)}"})

    references: dict[str, Tapper] = {}

    def reference(art: ModelArtifact) -> Any:
        key = art.content_hash()
        if key not in references:
            references[key] = (TorchTapper(art.torch_module(), threads=threads) if art.form is not Form.ONNX
                               else get_target(REFERENCE_RUNTIMES[art.form]).reference_tapper(art.path, threads=threads))
        return references[key]

    out_engines: dict[str, Any] = {}
    for e in engines:
        say(f"explain: {e.name}")
        entry: dict[str, Any] = {"target": e.target, "precision": e.precision}
        if e.note:
            entry["note"] = e.note
        try:
            runner = e.runner()
            try:
                logits = _logits(runner, x, bs)
            finally:
                runner.close()
            stage_rows.append(row(e.name, "engine", logits, form=e.target, precision=e.precision))
            entry["output_sqnr_db"] = _round(sqnr_db(ref_logits, logits))
        except Exception as exc:  # noqa: BLE001
            entry["status"] = f"engine did not run: {type(exc).__name__}: {first_line(exc)}"
            out_engines[e.name] = entry
            continue
        ref_art = _reference_for(e, by_hash, source)
        ref = reference(ref_art)
        entry["reference"] = "source" if ref_art is source else _stage_name(ref_art, stages)
        try:
            tap = e.tapper(getattr(ref, "layers", []))
        except NotImplementedError as exc:
            entry["layers_status"] = str(exc)
            out_engines[e.name] = entry
            continue
        except Exception as exc:  # noqa: BLE001
            entry["layers_status"] = f"cannot read its layers: {type(exc).__name__}: {first_line(exc)}"
            out_engines[e.name] = entry
            continue
        try:
            accs = {name: LayerStats() for name in tap.plan.layers}
            for i in range(0, len(x), bs):  # batch by batch: the reference's tensors are not all held at once
                got = tap(x[i : i + bs])
                want = ref(x[i : i + bs])
                for name, acc in accs.items():
                    if name in want:
                        acc.add(want[name], got[name], tap.plan.quantizers.get(name))
            order = [n for n in ref.plan.layers]
            layers = []
            for name in order:
                if name not in accs:
                    layers.append({"name": name, "status": "not found in the engine"})
                    continue
                layers.append({"name": name, **accs[name].result(tap.plan.quantizers.get(name))})
            for name in tap.plan.layers:
                if name not in set(order):
                    layers.append({"name": name, "status": "no layer of this name in the reference"})
            entry["layers"] = layers
            entry["unmapped"] = list(tap.plan.unmapped)
            if tap.plan.note:
                entry["taps"] = tap.plan.note
            if drift_x is not None and tap.plan.quantizers:
                batches = (ref(drift_x[i : i + bs]) for i in range(0, len(drift_x), bs))
                entry["calibration_drift"] = _drift(tap.plan.quantizers, batches, ref.plan.layers)
            if cfg.sensitivity and tap.can_bypass and tap.plan.quantizers:
                entry["sensitivity"] = _sensitivity(tap, x, ref_logits, entry["output_sqnr_db"], bs, say, e.name)
            elif cfg.sensitivity and tap.plan.quantizers:
                entry["sensitivity_status"] = (f"not measured: a {e.target} INT8 graph has no float path to take "
                                               "one quantizer out of; see the layers and the other engines")
        finally:
            tap.close()
        entry["verdict"] = _verdict(entry, cfg)
        out_engines[e.name] = entry
    for r in references.values():
        r.close()
    disagreements = _disagreements(out_engines, cfg)
    data = {
        "config": cfg.model_dump(),
        "images": {"count": int(len(x)), "from": images_from},
        "drift_images": {"count": 0 if drift_x is None else int(len(drift_x)), "from": drift_from},
        "stages": stage_rows,
        "engines": out_engines,
        "disagreements": disagreements,
        "seconds": round(time.perf_counter() - started, 2),
    }
    worst = {name: line for name, e in out_engines.items() if (line := worst_line(name, e))}
    return Explanation(data, worst)


def _drift(quantizers: dict[str, Quantizer], batches: Any, order: list[str]) -> list[dict[str, Any]]:
    """Per quantized layer: the share of the reference's activations on the evaluation images outside
    the calibrated range, and the share of the range their largest magnitude reaches."""
    stats = {name: RangeUse() for name in order if name in quantizers}
    for b in batches:
        for name, st in stats.items():
            a = b.get(name)
            if a is not None:
                st.add(a, quantizers[name])
    return [{"name": name, **st.result(), "values": st.count} for name, st in stats.items() if st.count]


def _stage_name(art: ModelArtifact, stages: list[tuple[str, str, ModelArtifact]]) -> str:
    key = art.content_hash()
    return next((step for step, _, a in stages if a.content_hash() == key), "source")


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _sensitivity(tap: Tapper, x: np.ndarray, ref_logits: np.ndarray, engine_db: float | None, bs: int,
                 say: Callable[[str], None], engine: str) -> list[dict[str, Any]]:
    rows = []
    base = engine_db if engine_db is not None else 99.0
    names = [n for n in tap.plan.layers if n in tap.plan.quantizers]
    for k, name in enumerate(names):
        if k % 10 == 0:
            say(f"explain: {engine} sensitivity {k + 1}/{len(names)}")
        try:
            run = tap.bypassed(name)
            logits = np.concatenate([np.asarray(run(x[i : i + bs]), np.float32) for i in range(0, len(x), bs)])
            db = sqnr_db(ref_logits, logits)
            db = 99.0 if db is None else db
            rows.append({"name": name, "output_sqnr_db_without": round(db, 2), "gain_db": round(db - base, 2)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"name": name, "status": f"{type(exc).__name__}: {first_line(exc)}"})
    rows.sort(key=lambda r: -r.get("gain_db", -1e9))
    return rows


def lowest_sqnr(layer: dict[str, Any]) -> float | None:
    vals = [v for v in (layer.get("sqnr_db"), layer.get("channel_sqnr_db")) if v is not None]
    return min(vals) if vals else None


def _verdict(entry: dict[str, Any], cfg: ExplainConfig) -> dict[str, Any]:
    layers = [layer for layer in entry.get("layers", []) if "status" not in layer]
    first = next((layer for layer in layers if (v := lowest_sqnr(layer)) is not None and v < cfg.threshold_db), None)
    verdict: dict[str, Any] = {"threshold_db": cfg.threshold_db}
    if first is not None:
        verdict["first_below"] = {"name": first["name"], "sqnr_db": first.get("sqnr_db"),
                                  "channel_sqnr_db": first.get("channel_sqnr_db")}
    sens = [s for s in entry.get("sensitivity", []) if "gain_db" in s]
    if sens:
        verdict["most_sensitive"] = sens[:3]
    drift = []
    for layer in entry.get("calibration_drift", []):
        outside, used = layer.get("outside_share") or 0.0, layer.get("range_used")
        if layer.get("values", DRIFT_MIN_VALUES) < DRIFT_MIN_VALUES:
            continue  # e.g. the logits of a few images: too few values to judge a share by
        if outside > cfg.drift_outside:
            drift.append({"name": layer["name"], "outside_share": outside,
                          "why": f"{100 * outside:.1f}% of its activations fall outside the calibrated range"})
        elif used is not None and used < cfg.drift_range_used:
            drift.append({"name": layer["name"], "range_used": used,
                          "why": f"its activations use {100 * used:.0f}% of the calibrated range"})
    if drift:
        verdict["drift"] = drift
    missing = [layer["name"] for layer in entry.get("layers", []) if "status" in layer]
    if missing or entry.get("unmapped"):
        verdict["not_compared"] = {"reference_layers": missing, "engine_layers": entry.get("unmapped", [])}
    return verdict


def worst_layer(entry: dict[str, Any]) -> dict[str, Any] | None:
    v = entry.get("verdict", {})
    if v.get("most_sensitive"):
        s = v["most_sensitive"][0]
        return {"name": s["name"], "why": f"without its quantizer the output SQNR gains {s['gain_db']:.1f} dB"}
    if v.get("first_below"):
        f = v["first_below"]
        return {"name": f["name"], "why": f"first layer below {v['threshold_db']:g} dB "
                                          f"(SQNR {fmt_value(f.get('sqnr_db'))}, channel {fmt_value(f.get('channel_sqnr_db'))})"}
    layers = [layer for layer in entry.get("layers", []) if lowest_sqnr(layer) is not None]
    if layers and entry.get("precision") not in ("fp32", "fp16"):
        w = min(layers, key=lowest_sqnr)
        return {"name": w["name"], "why": f"lowest SQNR ({fmt_value(lowest_sqnr(w))} dB)"}
    return None


def worst_line(name: str, entry: dict[str, Any]) -> str | None:
    w = worst_layer(entry)
    return None if w is None else f"{name}: worst layer {w['name']} ({w['why']})"


def _disagreements(engines: dict[str, Any], cfg: ExplainConfig) -> list[dict[str, Any]]:
    out = []
    names = [n for n, e in engines.items() if e.get("layers")]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ea, eb = engines[a], engines[b]
            if ea["precision"] != eb["precision"] or ea["target"] == eb["target"]:
                continue
            la = {layer["name"]: layer.get("sqnr_db") for layer in ea["layers"] if layer.get("sqnr_db") is not None}
            lb = {layer["name"]: layer.get("sqnr_db") for layer in eb["layers"] if layer.get("sqnr_db") is not None}
            far = [(n, la[n], lb[n]) for n in la if n in lb and abs(la[n] - lb[n]) > cfg.disagreement_db]
            if far:
                n, va, vb = far[0]
                out.append({"engines": [a, b], "precision": ea["precision"], "layers": len(far),
                            "first": {"name": n, a: va, b: vb}})
    return out


def fmt_value(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def engine_handles(engines: list[Any], *, threads: int, only: set[str] | None = None) -> list[EngineHandle]:
    """Handles for built engines (and for engines built elsewhere, e.g. TensorRT: their proxy)."""
    handles = []
    for e in engines:
        if only is not None and e.name not in only and _proxy_name(e) not in only:
            continue
        t = e.builder
        meta_path = e.path.parent / "engine.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        lineage = [*meta.get("lineage", []), {"input_hash": meta.get("input_hash", "")}]
        if e.built:
            runner, name, note = (lambda e=e, t=t: t.load(e, threads=threads)), e.name, ""
        else:
            runner, name = (lambda e=e, t=t: t.load_proxy(e, threads=threads)[1]), _proxy_name(e)
            note = f"not built here ({e.info.get('not_built', '')}); its graph on the proxy runtime"
        handles.append(EngineHandle(name=name, target=e.target, precision=e.precision, lineage=lineage,
                                    runner=runner, note=note,
                                    tapper=lambda ref, e=e, t=t: t.tapper(e, ref, threads=threads)))
    return handles


def _proxy_name(e: Any) -> str:
    return e.name if e.built else f"{e.name}-proxy-onnxruntime"


def held_out_images(source: ModelArtifact, data: Any, count: int) -> tuple[Any, np.ndarray, str]:
    """``count`` preprocessed validation images (data.validation: by default of the training split,
    held out of calibration), their labels and
    where they come from: an array where they are few (:func:`compressor.streaming.in_memory`), else
    a streamed :class:`compressor.streaming.ImageSet` (sliced like one)."""
    from ..streaming import in_memory

    size = tuple(source.input_spec.sample_shape[1:])
    images = data.validation_images(size, source.preprocessing, count).preprocessed(source.preprocessing)
    where = data.validation_where()
    return in_memory(images), images.labels, where


def explain_result(result: Any, data: Any, cfg: ExplainConfig, *, threads: int, only: set[str] | None = None,
                   say: Callable[[str], None] = lambda _m: None) -> Explanation:
    """Explain a finished :class:`compressor.records.RunResult` (the in-run path)."""
    x, labels, where = held_out_images(result.source, data, cfg.images)
    dx, dwhere = evaluation_sample(result.source, data, cfg.images)
    stages = [(r.step, r.name, a) for r, a in zip(result.records, result.artifacts[1:])]
    return explain(result.source, engine_handles(result.engines, threads=threads, only=only), x, labels,
                   stages=stages, images_from=where, threads=threads, cfg=cfg, drift_x=dx, drift_from=dwhere, say=say)


def evaluation_sample(source: ModelArtifact, data: Any, count: int) -> tuple[np.ndarray, str]:
    """Up to ``count`` of the evaluation images, spread over the evaluated order (the drift check
    only: no figure that picks anything is measured on them)."""
    from ..streaming import in_memory

    size = tuple(source.input_spec.sample_shape[1:])
    images = data.evaluation_images(size, source.preprocessing)  # only the picked ones are read
    pick = np.linspace(0, len(images) - 1, num=min(count, len(images))).astype(int) if len(images) else []
    return (in_memory(images.subset(pick).preprocessed(source.preprocessing)),
            f"of the evaluation split {data.config.evaluation.split!r}")


def cached_stages(pipeline: Any, source: ModelArtifact, data: Any) -> tuple[list[tuple[str, str, ModelArtifact]], list[str]]:
    """The output of every pass of the recipe's chains that the pass cache holds, and the steps it
    does not (a run with --no-cache, or a cleared cache)."""
    stages: list[tuple[str, str, ModelArtifact]] = []
    missing: list[str] = []

    def walk(passes: list[Any], art: ModelArtifact | None) -> ModelArtifact | None:
        for p in passes:
            hit = None
            if art is not None and pipeline.cache:  # the run's key: with the device (reduce_range: auto) and source
                hit = pipeline.cache.get(pipeline.cache.key(p, art, data, source, pipeline.device))
            if hit is None:
                missing.append(p.step)
                art = None
                continue
            art = hit[0]
            stages.append((p.step, p.name, art))
        return art

    main = walk(pipeline.passes, source)
    for b in pipeline.branches:
        walk(b.passes, main)
    return stages, missing
