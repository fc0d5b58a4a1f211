"""quantize_ptq's ``model_type: transformer`` and ``smooth_quant``: what each backend's library
recommends for attention models, as settings of the one quantizer call each backend makes, never a
code path per architecture.

* openvino (NNCF): ``model_type=nncf.ModelType.TRANSFORMER``. NNCF then leaves the ops of
  LayerNorm (MVN), residual Add, Multiply, Divide, Power, ReduceMean, Sqrt, comparisons and the like
  in float, gives the activation quantizers of attention MatMuls (both inputs activations) a
  symmetric scheme, picks the mixed preset where none is given, and runs SmoothQuant on the MatMuls:
  ``smooth_quant`` sets its alpha or turns it off; ``auto`` quantizes with NNCF's default (0.95) and
  without, and keeps the one whose logits are closer to the float model's on the first
  :data:`CHOICE_IMAGES` calibration images (the pass metrics' ``smooth_quant_choice``). Softmax is not
  quantized on the CPU in any mode.
* onnxruntime (``quantize_static``): the same ops kept in float, by their ONNX names
  (:data:`ORT_FLOAT_OPS`): ``op_types_to_quantize`` is ORT's own list of quantizable ops less those,
  so LayerNormalization, Softmax, Add, Mul and Concat get no Q/DQ and run in float between INT8
  MatMuls and convolutions; MatMul, Gemm and Conv outputs get none either
  (``OpTypesToExcludeOutputQuantization``). SmoothQuant is ORT's ``extra_options``
  ``SmoothQuant``/``SmoothQuantAlpha``, which imports neural-compressor 2.x's ``ORTSmoothQuant``:
  refused before the run where it is missing.
* tensorrt (ModelOpt): ModelOpt finds the attention blocks itself and places their Q/DQ for
  TensorRT's fused MHA kernels; LayerNorm and softmax get none. ``model_type`` is recorded; there is
  no SmoothQuant in ModelOpt's ONNX INT8 path.

The TFLite target is no backend of this pass; its PT2E quantizer (litert-torch) already leaves
LayerNorm (decomposed to MEAN, SQUARED_DIFFERENCE, RSQRT), SOFTMAX and the attention BATCH_MATMULs in
float, and the target's own ``model_type: transformer`` leaves the residual adds and multiplies
unannotated as well (targets/tflite.py, TRANSFORMER_FLOAT_OPS; ViT's class-token concatenation is
made INT8 by the LiteRT converter all the same).
"""

from __future__ import annotations

import importlib.util
from typing import Any

ORT_FLOAT_OPS = frozenset({
    "Add", "Mul", "Softmax", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
    "EmbedLayerNormalization", "AveragePool", "Squeeze", "Where", "Concat",
})
"""ONNX op types a transformer keeps in float on ONNX Runtime: NNCF's ignored metatypes for
ModelType.TRANSFORMER (Add, Multiply, MVN, BatchNorm, AvgPool, Squeeze, comparisons, ...) and Softmax,
by the names they have in ORT's registry of quantizable ops; and Concat, which joins ViT's class
token to the patch tokens: one INT8 scale for both crushes the class token, whose values are far
smaller, and the classifier reads only that token (a 224x224 ViT, 4 layers: output SQNR 7.5 dB with
Concat quantized, 29.2 dB without)"""

NNCF_SMOOTH_QUANT_DEFAULT = 0.95
"""NNCF's AdvancedSmoothQuantParameters().matmul: the alpha ``smooth_quant: auto`` means on openvino"""

_ORT_SMOOTH_QUANT_MODULE = "neural_compressor.adaptor.ox_utils.smooth_quant"


def smooth_quant_problem(backend: str, model_type: str, smooth_quant: float | str) -> str | None:
    """Why ``smooth_quant`` cannot be honoured with this backend and model type (None where it can):
    the recipe is refused rather than the setting ignored."""
    if not isinstance(smooth_quant, (int, float)):
        return None
    if not 0.0 <= smooth_quant <= 1.0:
        return f"smooth_quant must be an alpha in 0..1, or auto or off; got {smooth_quant}"
    if model_type != "transformer":
        return ("smooth_quant applies with model_type transformer (NNCF runs SmoothQuant only for "
                "transformers): add model_type: transformer or remove smooth_quant")
    if backend == "tensorrt":
        return "smooth_quant: ModelOpt's ONNX INT8 quantization (backend tensorrt) has no SmoothQuant: remove it"
    return None


def ort_smooth_quant_missing() -> str | None:
    """Why ONNX Runtime's SmoothQuant cannot run here (None where neural-compressor 2.x is installed)."""
    try:
        found = importlib.util.find_spec(_ORT_SMOOTH_QUANT_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return ("smooth_quant with backend onnxruntime: ONNX Runtime's SmoothQuant imports neural-compressor 2.x's "
            "ORTSmoothQuant, which is not installed here (pip install 'neural-compressor<3'); use backend "
            "openvino (NNCF's own SmoothQuant) or smooth_quant: auto")


def smooth_quant_alpha(config: Any) -> float | None:
    """The SmoothQuant alpha a backend uses where nothing is measured (None: none); on openvino ``auto``
    is measured instead (:func:`nncf_smooth_quant_candidates`)."""
    if config.model_type != "transformer" or config.smooth_quant == "off":
        return None
    if config.smooth_quant == "auto":
        return NNCF_SMOOTH_QUANT_DEFAULT if config.backend == "openvino" else None
    return float(config.smooth_quant)


CHOICE_IMAGES = 32
"""calibration images on which ``smooth_quant: auto`` compares the output SQNR with and without SmoothQuant"""


def nncf_smooth_quant_candidates(config: Any) -> list[float | None]:
    """The SmoothQuant alphas NNCF quantizes with: one, or for ``smooth_quant: auto`` on a transformer
    NNCF's default and none, of which the backend keeps the one whose output is closer to the float
    model's (SmoothQuant where it helps: on random-weight ViT and Swin, which have no outlier
    channels for it to tame, alpha 0.95 cost 1 and 10 dB)."""
    if config.model_type == "transformer" and config.smooth_quant == "auto":
        return [NNCF_SMOOTH_QUANT_DEFAULT, None]
    return [smooth_quant_alpha(config)]


def nncf_arguments(config: Any, arguments: dict[str, Any], alpha: float | None = None) -> dict[str, Any]:
    """``arguments`` (of ``nncf.quantize``) with the transformer settings: model_type, SmoothQuant's
    ``alpha`` on the MatMuls (None: off), and no preset where the recipe gave none (NNCF then picks
    mixed)."""
    if config.model_type != "transformer":
        return arguments
    import copy

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    arguments = dict(arguments)
    arguments["model_type"] = nncf.ModelType.TRANSFORMER
    if "preset" not in config.model_fields_set:
        arguments["preset"] = None
    advanced = copy.copy(arguments["advanced_parameters"])
    advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(convolution=-1, matmul=-1 if alpha is None else alpha)
    arguments["advanced_parameters"] = advanced
    return arguments


def ort_op_types(config: Any) -> list[str] | None:
    """``op_types_to_quantize`` for ONNX Runtime's quantize_static (None: ORT's default, every op it can)."""
    if config.model_type != "transformer":
        return None
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - ORT_FLOAT_OPS)


ORT_FLOAT_OUTPUTS = ("MatMul", "Gemm", "Conv")
"""op types whose output a transformer keeps in float on ONNX Runtime: ORT quantizes a MatMul's,
Gemm's or Conv's output by default, and that Q/DQ pair then feeds the softmax, the residual Add or
the LayerNorm after the patch embedding (every consumer of a tensor gets its one pair), which would
put them back on the INT8 grid (swin_t at 224: LayerNormalization 1 of 29 with an INT8 input, output
SQNR 31.3 dB; with Conv here 0 of 29, 31.7 dB)"""


def ort_extra_options(config: Any) -> dict[str, Any]:
    """extra_options of quantize_static for the transformer settings."""
    if config.model_type != "transformer":
        return {}
    options: dict[str, Any] = {"OpTypesToExcludeOutputQuantization": list(ORT_FLOAT_OUTPUTS)}
    alpha = smooth_quant_alpha(config)
    if alpha is not None:
        options.update(SmoothQuant=True, SmoothQuantAlpha=alpha)
    return options


_UNSET = object()


def record(config: Any, alpha: Any = _UNSET, **extra: Any) -> dict[str, Any]:
    """The pass metrics' ``model_type`` and ``smooth_quant_alpha`` (the one used)."""
    return {"model_type": config.model_type,
            "smooth_quant_alpha": smooth_quant_alpha(config) if alpha is _UNSET else alpha, **extra}


# ---------------------------------------------------------------------- what the graph kept in float

def openvino_int8_inputs(model: Any) -> dict[str, list[int]]:
    """{op type: [ops with an input from a FakeQuantize, ops]} of an OpenVINO model, for the op types
    a transformer keeps in float and the layers it quantizes: proof of what the quantizer did."""
    kinds = ("MVN", "Softmax", "Add", "Multiply", "MatMul", "Convolution")
    out = {k: [0, 0] for k in kinds}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in out:
            continue
        out[kind][1] += 1
        sources = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        for node in sources:  # through a Reshape / Transpose / Convert the quantizer put between
            while node.get_type_name() in ("Reshape", "Transpose", "Convert") and node.get_input_size():
                node = node.input_value(0).get_node()
            if node.get_type_name() == "FakeQuantize":
                out[kind][0] += 1
                break
    return {k: v for k, v in out.items() if v[1]}


def onnx_int8_inputs(proto: Any) -> dict[str, list[int]]:
    """{op type: [nodes with an input from a DequantizeLinear, nodes]} of a QDQ ONNX graph, for the
    op types a transformer keeps in float and the layers it quantizes."""
    kinds = ("LayerNormalization", "Softmax", "Add", "Mul", "MatMul", "Gemm", "Conv")
    made_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    out = {k: [0, 0] for k in kinds}
    for node in proto.graph.node:
        if node.op_type not in out:
            continue
        out[node.op_type][1] += 1
        if any(made_by.get(i) == "DequantizeLinear" for i in node.input):
            out[node.op_type][0] += 1
    return {k: v for k, v in out.items() if v[1]}
