"""tflite: a LiteRT (TFLite) flatbuffer made by Google's PyTorch converter (litert-torch, formerly
ai-edge-torch) and run by the LiteRT interpreter (ai-edge-litert) on its default XNNPACK delegate.

Quantization (``quantization``):

* ``none``: the FP32 flatbuffer from ``litert_torch.convert``.
* ``fp16``: the FP32 flatbuffer with conv / depthwise / fully-connected weights cast to FP16 by
  ai-edge-quantizer (``float_casting``, weight-only). Half the size; XNNPACK on x86 unpacks the
  weights and computes in FP32, so it is no faster than FP32.
* ``dynamic_int8``: per-channel int8 weights by ai-edge-quantizer (``dynamic_wi8_afp32``);
  activations are quantized at run time by the kernels.
* ``int8``: full integer. PT2E: the module is captured with ``torch.export``, annotated by
  litert-torch's ``PT2EQuantizer`` (per-channel symmetric int8 weights, int8 activations from
  histogram observers), calibrated on the recipe's calibration images, and converted by
  ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))``. Every conv, add,
  pool and the classifier then run as int8 kernels.
  The converter gives the model an int8 input and output; ``io: float`` (the default) adds a
  QUANTIZE op on the input and a DEQUANTIZE op on the output so that it takes and returns float32
  like the other engines (XNNPACK runs both in the same partition; faster than doing it in numpy).
  ``int8_method: ai_edge_quantizer`` quantizes the FP32 flatbuffer with ai-edge-quantizer's
  ``static_wi8_ai8`` (min/max calibration in the LiteRT interpreter) instead.

The engine's ``info`` counts the flatbuffer's operators by type and tensor types; the runner's
``runtime_info`` says how many partitions XNNPACK took and which operators it left to the
built-in kernels.


The package: :mod:`.target` (config, conversion, the PT2E budget), :mod:`.runner` (the interpreter),
:mod:`.taps` (per-layer taps), :mod:`.pt2e` (PT2E quantizer helpers), :mod:`.flatbuffer` (flatbuffer
tools). The TorchScript -> torch.export conversion is :func:`compressor.intake.torchscript_to_export`.
"""

from .runner import TFLiteRunner
from .target import PRECISION, TFLiteConfig, TFLiteTarget

__all__ = ["PRECISION", "TFLiteConfig", "TFLiteRunner", "TFLiteTarget"]
