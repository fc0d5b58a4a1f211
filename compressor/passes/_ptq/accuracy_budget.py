"""quantize_ptq under an accuracy budget (``max_drop``, top-1 points on validation images held out
of the training split, never the test split): when plain PTQ loses more than the budget, the most
sensitive layers stay out of INT8 until it holds, each backend with its own means.

* openvino: NNCF's ``quantize_with_accuracy_control`` (in :mod:`.openvino_nncf`); this module gives
  it the budget, the metrics block and the latency each kept layer costs.
* onnxruntime and tensorrt: :func:`search_onnx`. The plain QDQ graph's quantized nodes (every
  Conv/Gemm/MatMul, and quantized ops not on such a layer's input path: a residual Add, a pooling
  ModelOpt quantizes on its own) are ranked by how much of the output error (NMSE of the logits
  against the float model's, on validation images) goes away when that one node runs in float:
  its weights replaced by the float ones, its input Q/DQ pairs (and those of the pooling,
  activation and reshaping ops feeding it) by a Clip to the same range, so that an activation the
  quantizer folded into a Q/DQ pair keeps its effect. Then the backend's quantizer runs again with
  the top 1, 2, ... nodes in its excluded nodes (ONNX Runtime's ``nodes_to_exclude``, ModelOpt's
  ``nodes_to_exclude``), until the validation drop holds or ``max_kept_layers`` is reached; where
  a step gains less than half the way, the rest are ranked again on that step's model. A kept
  node's float input path (the ops between it and the layer before) is excluded too; where the
  quantizer still puts a Q/DQ pair on that path (ONNX Runtime quantizes a quantized node's
  output), the node owning it is excluded as well and listed as kept for it.

A setting meets the budget when the one-sided upper confidence bound of its drop (:mod:`compressor.bound`,
from the float model's and its per-image correctness, at ``confidence``) is within ``max_drop``,
not its point estimate. Where a setting's bound misses only for lack of images and the training
split has more, the validation set grows to what the bound needs at the observed disagreement (up
to :data:`compressor.bound.IMAGES_CAP`, and to what fits in memory) and the setting is judged again.

When no setting meets the budget, the best one found is returned with ``met: false`` in the
``accuracy_budget`` metrics block, for the run to fail on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ...fidelity.budget import LEAST_IMAGES, make_budget  # noqa: F401 - quantize_ptq's, through here
from ...fidelity.budget import Budget, Candidate, keep_float_loop, latency_costs, metrics_block
from ...fidelity.metrics import nmse
from ...fidelity.naming import ONNX_LAYER_OPS as LAYER_OPS
from ...fidelity.naming import ONNX_PASS_THROUGH as PASS_THROUGH
from ...fidelity.naming import module_name

log = logging.getLogger(__name__)
RANKING_IMAGES = 256


# ---------------------------------------------------------------------- ONNX (onnxruntime, tensorrt)


def ort_logits(model: str | Path | bytes, x: np.ndarray, threads: int, batch: int = 64) -> np.ndarray:
    """Logits of an ONNX model (a file or serialized bytes) on ONNX Runtime's CPU provider."""
    from ...ort_session import cpu_session, session_options

    sess = cpu_session(model, session_options(threads))
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    return np.concatenate([sess.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)])


class QDQGraph:
    """A QDQ ONNX graph beside the float graph it was quantized from (same node names)."""

    def __init__(self, qdq: Any, reference: Any) -> None:
        self.model = qdq
        graph = qdq.graph
        self.producer = {out: n for n in graph.node for out in n.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.ref_nodes = {n.name: n for n in reference.graph.node if n.name}
        self.ref_inits = {t.name: t for t in reference.graph.initializer}
        self._undo: list[tuple[Any, int, str]] = []
        self._added_nodes = 0
        self._added_inits = 0
        self._made: set[str] = set()

    def _array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def _quantized_input(self, name: str) -> tuple[Any, Any | None] | None:
        """(DequantizeLinear, its QuantizeLinear or None for a quantized initializer) feeding ``name``."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        return dq, q if q is not None and q.op_type == "QuantizeLinear" else None

    def _path(self, tensor: str) -> list[tuple[Any, tuple[Any, Any | None] | None]]:
        """The pass-through ops upstream of ``tensor`` (through Q/DQ pairs), each with the quantized
        input it has, if any."""
        out = []
        found = self._quantized_input(tensor)
        op = self.producer.get(found[1].input[0] if found and found[1] is not None else tensor)
        while op is not None and op.op_type in PASS_THROUGH:
            found = self._quantized_input(op.input[0])
            out.append((op, found))
            op = self.producer.get(found[1].input[0] if found and found[1] is not None else op.input[0])
        return out

    def candidates(self) -> list[Any]:
        """The nodes with a quantized input that may be kept in float: every Conv/Gemm/MatMul, and
        any other quantized op (a residual Add, a pooling the quantizer quantizes on its own) that is
        not on such a layer's input path."""
        quantized = [n for n in self.model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                     and any(self._quantized_input(i) for i in n.input if i)]
        layers = [n for n in quantized if n.op_type in LAYER_OPS]
        covered = {op.name for n in layers for i in n.input if i for op, _ in self._path(i)}
        return layers + [n for n in quantized if n.op_type not in LAYER_OPS and n.name not in covered]

    # -------------------------------------------------------------- edits, undone by restore()
    def _set_input(self, node: Any, index: int, name: str) -> None:
        self._undo.append((node, index, node.input[index]))
        node.input[index] = name

    def _add_init(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        self._added_inits += 1

    def _clipped(self, q: Any) -> str:
        """``q``'s input clipped to the range its Q/DQ pair represents (no rounding)."""
        src = q.input[0]
        out = f"{src}__float_clip"
        if out in self._made:
            return out
        scale = self._array(q.input[1])
        zp = self._array(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        try:
            info = np.iinfo(zp.dtype if zp is not None else np.uint8)
        except (TypeError, ValueError):
            info = None
        if scale is None or scale.size != 1 or info is None or (zp is not None and zp.size != 1):
            return src
        from onnx import helper

        s, z = float(scale.reshape(())), float(zp.reshape(())) if zp is not None else 0.0
        self._add_init(out + "_lo", np.array((info.min - z) * s, np.float32))
        self._add_init(out + "_hi", np.array((info.max - z) * s, np.float32))
        self.model.graph.node.append(helper.make_node("Clip", [src, out + "_lo", out + "_hi"], [out], name=out))
        self._added_nodes += 1
        self._made.add(out)
        return out

    def _float_weight(self, node: Any, index: int, dq: Any) -> str:
        """The float tensor of a quantized initializer input: the reference graph's, or the dequantized values."""
        ref = self.ref_nodes.get(node.name)
        name = ref.input[index] if ref is not None and index < len(ref.input) else ""
        out = f"{name or dq.input[0]}__float"
        if out in self._made:
            return out
        if name in self.ref_inits:
            from onnx import numpy_helper

            value = numpy_helper.to_array(self.ref_inits[name])
        else:
            q, scale = self._array(dq.input[0]), self._array(dq.input[1])
            zp = self._array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            if q is None or scale is None:
                return dq.output[0]
            shape = [1] * q.ndim
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if scale.size > 1:
                shape[axis] = -1
            value = ((q.astype(np.float32) - (0 if zp is None else zp.astype(np.float32).reshape(shape)))
                     * scale.astype(np.float32).reshape(shape))
        self._add_init(out, value.astype(np.float32))
        self._made.add(out)
        return out

    def float_layer(self, node: Any) -> None:
        """Run ``node`` in float: float weights, and its activation inputs (through the pass-through
        ops feeding it) clipped instead of quantized."""
        for index, name in enumerate(node.input):
            found = self._quantized_input(name) if name else None
            if found is None:
                continue
            dq, q = found
            if q is None:
                self._set_input(node, index, self._float_weight(node, index, dq))
            elif q.input[0] in self.inits:  # a float weight through Q and DQ (ModelOpt)
                self._set_input(node, index, q.input[0])
            else:
                self._set_input(node, index, self._clipped(q))
                for op, upstream in self._path(name):
                    if upstream is not None and upstream[1] is not None:
                        self._set_input(op, 0, self._clipped(upstream[1]))

    def restore(self) -> None:
        for node, index, old in reversed(self._undo):
            node.input[index] = old
        graph = self.model.graph
        if self._added_nodes:
            del graph.node[-self._added_nodes:]
        if self._added_inits:
            del graph.initializer[-self._added_inits:]
        self._undo, self._added_nodes, self._added_inits, self._made = [], 0, 0, set()


def rank_layers(qdq_path: Path, float_path: Path, budget: Budget, skip: Iterable[str] = ()) -> list[tuple[str, float]]:
    """(node, output NMSE with that node in float) of the candidates of a QDQ model (see
    :meth:`QDQGraph.candidates`), most sensitive (lowest NMSE) first."""
    import onnx

    x = budget.x[:RANKING_IMAGES]
    reference = ort_logits(float_path, x, budget.threads)
    graph = QDQGraph(onnx.load(str(qdq_path)), onnx.load(str(float_path)))
    scores = []
    for node in graph.candidates():
        if node.name in skip:
            continue
        graph.float_layer(node)
        try:
            scores.append((node.name, nmse(reference, ort_logits(graph.model.SerializeToString(), x, budget.threads))))
        finally:
            graph.restore()
    return sorted(scores, key=lambda s: s[1])


class FloatPaths:
    """Which nodes keep a layer in float, from the float graph: the layer, the pass-through ops on
    its activation inputs, and (where the quantizer quantizes a quantized node's output) the node
    producing that path's input."""

    def __init__(self, reference: Any) -> None:
        graph = reference.graph
        self.nodes = {n.name: n for n in graph.node}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.inits = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                            for o in n.output}

    def op_type(self, name: str) -> str | None:
        node = self.nodes.get(name)
        return node.op_type if node is not None else None

    def weight(self, name: str) -> str | None:
        node = self.nodes.get(name)
        return next((i for i in node.input[1:] if i in self.inits), None) if node is not None else None

    def group(self, layer: str, with_producer: bool) -> list[str]:
        out = [layer]
        for tensor in self.nodes[layer].input if layer in self.nodes else ():
            if not tensor or tensor in self.inits:
                continue
            op = self.producer.get(tensor)
            while op is not None and op.op_type in PASS_THROUGH:
                out.append(op.name)
                op = self.producer.get(op.input[0])
            if op is not None and with_producer:
                out.append(op.name)
        return out


def quantized_path_owners(qdq_path: Path, kept: Iterable[str]) -> list[str]:
    """Nodes whose output still comes through a Q/DQ pair into one of the ``kept`` nodes (through
    pass-through ops): the owners of quantization a kept node's input should not have."""
    import onnx

    graph = onnx.load(str(qdq_path), load_external_data=False).graph
    producer = {out: n for n in graph.node for out in n.output}
    nodes = {n.name: n for n in graph.node}
    owners: list[str] = []
    for name in kept:
        for tensor in nodes[name].input if name in nodes else ():
            op = producer.get(tensor)
            while op is not None and op.op_type in PASS_THROUGH:
                op = producer.get(op.input[0])
            q = producer.get(op.input[0]) if op is not None and op.op_type == "DequantizeLinear" else None
            owner = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if owner is not None:
                owners.append(owner.name)
    return owners


def search_onnx(float_path: Path, plain_path: Path, budget: Budget, requantize: Callable[[list[str], Path], None],
                work_dir: Path, *, producer_outputs_quantized: bool, method: str,
                latency_runtime: str = "onnxruntime CPU") -> tuple[Path, dict[str, Any]]:
    """Quantize within ``budget``: ``plain_path`` is the plain QDQ model of ``float_path``;
    ``requantize(excluded_nodes, dst)`` runs the backend's quantizer with those nodes kept in float.
    Returns the chosen model (moved to ``work_dir/model.onnx``) and the ``accuracy_budget`` block."""
    import onnx

    def run(model: Path) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: ort_logits(model, x, budget.threads)

    budget.set_reference(run(float_path))
    plain = budget.verdict(run(plain_path))
    paths = FloatPaths(onnx.load(str(float_path), load_external_data=False))
    ranking: list[tuple[str, float]] = []
    made: dict[tuple[str, ...], tuple[Path, list[str]]] = {(): (plain_path, [])}
    owners_seen: dict[str, list[str]] = {}

    def build(layers: list[str], tag: str) -> tuple[Path, list[str]]:
        """The model with ``layers`` kept in float, and the nodes excluded for it."""
        key = tuple(sorted(layers))
        if key in made:
            return made[key]
        excluded = list(dict.fromkeys(n for layer in layers for n in
                                      (*paths.group(layer, producer_outputs_quantized), *owners_seen.get(layer, []))))
        dst = work_dir / f"{tag}.onnx"
        for _ in range(3):
            requantize(excluded, dst)
            extra = [o for o in quantized_path_owners(dst, layers) if o not in excluded]
            if not extra:
                break
            for layer in layers:  # remember, so that later tries exclude them at once
                owners_seen.setdefault(layer, []).extend(o for o in extra if o not in owners_seen[layer])
            excluded += list(dict.fromkeys(extra))
        made[key] = (dst, excluded)
        return made[key]

    if not budget.holds(plain):
        ranking = rank_layers(plain_path, float_path, budget)

    def candidate(layers: list[str]) -> Candidate:
        path, excluded = build(layers, f"try-{len(layers)}")
        return Candidate((path, excluded), run(path), {"excluded_nodes": excluded})

    found = keep_float_loop(budget, Candidate((plain_path, []), run(plain_path)), plain, ranking, candidate,
                            rerank=lambda c: rank_layers(c.model[0], float_path, budget, skip=c.model[1]),
                            noun="nodes")
    (path, excluded), layers, scores = found.best.model, found.kept, found.scores
    plain, best = budget.current(plain, run(plain_path)), budget.current(found.verdict, run(path))
    tries = found.tries

    latencies: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if layers and budget.layer_latency:
        from ...targets.onnxruntime import OrtRunner

        variants = {layer: build([other for other in layers if other != layer], f"without-{i}")[0]
                    for i, layer in enumerate(layers)}
        final_ms, latencies = latency_costs(OrtRunner(path, threads=budget.threads),
                                            {k: OrtRunner(v, threads=budget.threads) for k, v in variants.items()},
                                            budget.x[:1])
        extra["latency_ms"] = {"budgeted": final_ms, "runtime": latency_runtime, "threads": budget.threads}

    kept = []
    for node in (n for n in excluded if n in layers or paths.op_type(n) in LAYER_OPS):
        kept.append({
            "node": node,
            "op_type": paths.op_type(node),
            "source_module": module_name(node, paths.weight(node)),
            # a node the search chose, or the one whose float input path needed this layer too
            "kept_for": node if node in layers else next(
                (layer for layer in layers if node in paths.group(layer, True) + owners_seen.get(layer, [])), None),
            "nmse_in_float": scores.get(node) if node in layers else None,
            "latency_cost_ms": latencies.get(node),
        })
    final = work_dir / "model.onnx"
    path.replace(final)
    for p, _ in made.values():
        if p != path:
            p.unlink(missing_ok=True)
    metrics = metrics_block(budget, method=method, plain=plain, final=best, kept=kept, tries=tries, excluded_nodes=excluded,
                            ranking=[{"node": n, "nmse_in_float": e} for n, e in ranking[:10]], **extra)
    return final, metrics
