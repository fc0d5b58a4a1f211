"""The tflite target's taps: LiteRT tensor names keep only the leaf module name, so layers are
matched in graph order by kind, weight shape and that leaf name; the interpreter runs with its
tensors preserved and without the XNNPACK delegate (a delegate keeps no intermediate tensors)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ...fidelity.naming import qrange
from ...fidelity.tapper import LayerInfo, Quantizer, TapPlan, Tapper
from .runner import quantize

_TFL_LAYERS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "linear",
               "TRANSPOSE_CONV": "conv"}
_TFL_FOLLOW = {"HARD_SWISH", "LOGISTIC", "RELU", "RELU6", "LEAKY_RELU", "GELU", "ELU", "RELU_N1_TO_1"}


def _tfl_shape_fits(kind: str, shape: tuple[int, ...], ref: LayerInfo) -> bool:
    w = ref.weight_shape
    if kind != ref.kind:
        return False
    if kind == "conv" and len(shape) == 4 and len(w) == 4:  # TFLite OHWI, torch OIHW
        return (shape[0], shape[3], shape[1], shape[2]) == w
    if kind == "depthwise" and len(shape) == 4 and len(w) == 4:  # TFLite 1HWO
        return (shape[3], shape[1], shape[2]) == (w[0], w[2], w[3])
    if kind == "linear" and len(shape) == 2:
        return tuple(shape) == w
    return False


class TFLiteTapper(Tapper):
    """Matches the reference's layers to the flatbuffer's conv / FC ops (kind, weight shape, leaf
    name, order) and reads their outputs with the tensors preserved, sample by sample."""

    def __init__(self, path: Path, reference: list[LayerInfo], *, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.interp = Interpreter(model_path=str(path), num_threads=threads, experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        tensors = {d["index"]: d for d in self.interp.get_tensor_details()}
        ops = [o for o in self.interp._get_ops_details()]
        consumers: dict[int, list[dict]] = defaultdict(list)
        for o in ops:
            for t in o["inputs"]:
                consumers[int(t)].append(o)
        layer_ops = [o for o in ops if o["op_name"] in _TFL_LAYERS and len(o["inputs"]) > 1]
        used: set[int] = set()
        self.plan = TapPlan(note="LiteRT built-in kernels with tensors preserved (no XNNPACK delegate)")
        self.taps: dict[str, dict] = {}
        pos = 0
        for ref in reference:
            leaf = ref.name.rsplit(".", 1)[-1]
            best = None
            for j, o in enumerate(layer_ops):
                if j in used:
                    continue
                shape = tuple(int(s) for s in tensors[int(o["inputs"][1])]["shape"])
                if not _tfl_shape_fits(_TFL_LAYERS[o["op_name"]], shape, ref):
                    continue
                names = tensors[int(o["outputs"][0])]["name"] + tensors[int(o["inputs"][1])]["name"]
                score = (0 if re.search(rf"_{re.escape(leaf)}(;|$)", names) else 1, abs(j - pos))
                if best is None or score < best[0]:
                    best = (score, j)
            if best is None:
                continue
            j = best[1]
            used.add(j)
            pos = j + 1
            out = int(layer_ops[j]["outputs"][0])
            cons = consumers.get(out, [])
            if len(cons) == 1 and cons[0]["op_name"] in _TFL_FOLLOW:
                out = int(cons[0]["outputs"][0])
            detail = tensors[out]
            self.taps[ref.name] = detail
            scale, zp = detail["quantization"]
            if np.issubdtype(detail["dtype"], np.integer) and scale:
                lo, hi = qrange(detail["dtype"])
                self.plan.quantizers[ref.name] = Quantizer((lo - zp) * scale, (hi - zp) * scale)
            self.plan.layers.append(ref.name)
        order = {name: i for i, name in enumerate(r.name for r in reference)}
        self.plan.layers.sort(key=order.__getitem__)
        self.plan.unmapped = [tensors[int(o["outputs"][0])]["name"] for j, o in enumerate(layer_ops) if j not in used]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        got: dict[str, list[np.ndarray]] = {name: [] for name in self.plan.layers}
        for i in range(len(x)):
            self.interp.set_tensor(self.inp["index"], quantize(x[i : i + 1], self.inp))
            self.interp.invoke()
            for name in self.plan.layers:
                d = self.taps[name]
                arr = self.interp.get_tensor(d["index"])
                scale, zp = d["quantization"]
                if np.issubdtype(arr.dtype, np.integer) and scale:
                    arr = (arr.astype(np.float32) - zp) * scale
                if arr.ndim == 4:
                    arr = arr.transpose(0, 3, 1, 2)
                got[name].append(arr.astype(np.float32, copy=True))
        return {name: np.concatenate(parts) for name, parts in got.items()}
