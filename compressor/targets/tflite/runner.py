"""Running a LiteRT flatbuffer: the interpreter on XNNPACK per batch size, float batches in and out
whatever the model's input and output types, and what the delegate took."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ...target_base import Runner

log = logging.getLogger("compressor.targets.tflite")


class TFLiteRunner(Runner):
    """One LiteRT interpreter per batch size (the input resized, then tensors allocated), XNNPACK
    delegate with exactly ``threads`` threads. Float NCHW batches in, float logits out; quantized
    inputs and outputs are (de)quantized with the model's own scales. A graph that cannot be
    resized to a batch is run sample by sample at batch 1 (``runtime_info`` says so)."""

    def __init__(self, path: Path, *, threads: int) -> None:
        self.name = "tflite"
        self.path = Path(path)
        self.threads = threads
        self._interpreters: dict[int, Any] = {}
        self._looped: set[int] = set()
        self._io: dict[int, tuple[dict, dict]] = {}

    def _make(self, batch: int) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(self.path), num_threads=self.threads)
        inp = interp.get_input_details()[0]
        if batch != int(inp["shape"][0]):
            interp.resize_tensor_input(inp["index"], [batch, *[int(d) for d in inp["shape"][1:]]], strict=False)
        interp.allocate_tensors()
        out = interp.get_output_details()[0]
        if int(out["shape"][0]) != batch:
            raise ValueError(f"output batch {out['shape'][0]} after resizing the input to {batch}")
        return interp

    def prepare(self, batch: int) -> None:
        if batch in self._interpreters or batch in self._looped:
            return
        if 1 not in self._interpreters:
            self._add(1, self._make(1))
        if batch == 1:
            return
        try:
            self._add(batch, self._make(batch))
        except Exception as exc:
            log.warning("tflite: cannot resize %s to batch %d (%s); running it sample by sample", self.path, batch, exc)
            self._looped.add(batch)

    def _add(self, batch: int, interp: Any) -> None:
        self._interpreters[batch] = interp
        self._io[batch] = (interp.get_input_details()[0], interp.get_output_details()[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = len(x)
        if batch not in self._interpreters and batch not in self._looped:
            self.prepare(batch)
        if batch in self._looped:
            return np.concatenate([self._run(1, x[i : i + 1]) for i in range(batch)])
        return self._run(batch, x)

    def _run(self, batch: int, x: np.ndarray) -> np.ndarray:
        interp = self._interpreters[batch]
        inp, out = self._io[batch]
        interp.set_tensor(inp["index"], quantize(x, inp))
        interp.invoke()
        return dequantize(interp.get_tensor(out["index"]), out)

    def runtime_info(self) -> dict[str, Any]:
        import ai_edge_litert

        if 1 not in self._interpreters:
            self.prepare(1)
        interp = self._interpreters[1]
        inp, out = self._io[1]
        partitions, undelegated = delegation(interp)
        return {
            "runtime": f"ai-edge-litert {ai_edge_litert.__version__}",
            "threads": self.threads,
            "delegate": "XNNPACK" if partitions else "none (built-in kernels)",
            "xnnpack_partitions": partitions,
            "undelegated_ops": dict(undelegated.most_common()),
            "input_dtype": np.dtype(inp["dtype"]).name,
            "output_dtype": np.dtype(out["dtype"]).name,
            "input_quantization": _qparams(inp),
            "output_quantization": _qparams(out),
            "batching": ("resized interpreter per batch size" if not self._looped else
                         f"batch 1 loop for batch sizes {sorted(self._looped)} (input cannot be resized)"),
            "batch_sizes": sorted(self._interpreters),
        }

    def close(self) -> None:
        self._interpreters.clear()
        self._io.clear()


# ---------------------------------------------------------------------- helpers


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.multiply(x, np.float32(1.0 / scale), dtype=np.float32)
    q += np.float32(zero)
    np.rint(q, out=q)
    np.clip(q, info.min, info.max, out=q)
    return q.astype(dtype)


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]) == np.float32:
        return y.copy()
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - np.float32(zero)) * np.float32(scale)


def _qparams(detail: dict) -> dict[str, float] | None:
    scale, zero = detail["quantization"]
    return None if not scale else {"scale": float(scale), "zero_point": int(zero)}


def delegation(interp: Any) -> tuple[int, Counter[str]]:
    """How many partitions XNNPACK took, and the original operators left to the built-in kernels.

    An operator runs outside the delegate exactly when one of its outputs feeds a delegate
    partition or the model's output without being produced by a partition, or feeds such an
    operator; the walk goes backwards from those tensors."""
    nodes = interp._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    if not delegates:
        return 0, Counter(n["op_name"] for n in nodes)
    delegated_out = {int(t) for d in delegates for t in d["outputs"]}
    originals = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): n for n in originals for t in n["outputs"]}
    frontier = [int(t) for d in delegates for t in d["inputs"]]
    frontier += [int(d["index"]) for d in interp.get_output_details()]
    outside: dict[int, dict] = {}
    while frontier:
        t = frontier.pop()
        if t in delegated_out or t not in producer:
            continue
        node = producer[t]
        if node["index"] in outside:
            continue
        outside[node["index"]] = node
        frontier.extend(int(i) for i in node["inputs"] if i >= 0)
    return len(delegates), Counter(n["op_name"] for n in outside.values())
