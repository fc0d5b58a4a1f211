"""What the passes that run ``nncf.quantize`` share: one config block (preset, bias correction,
overflow fix) and its mapping to NNCF's arguments, as Olive's quantization passes share one config
block. Used by quantize_ptq (backend openvino, on an OpenVINO model) and quantize_qat (its PTQ
initialisation, on the torch module). The leading underscore keeps the registry from loading it as
a pass; NNCF is imported only when the arguments are made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..pass_base import PassConfig

if TYPE_CHECKING:
    from ..devices import Device


class NNCFQuantizationConfig(PassConfig):
    """The NNCF settings of a pass config; the pass's own fields follow them."""

    preset: Literal["performance", "mixed"] = "performance"
    """NNCF: symmetric (performance) or asymmetric (mixed) activation quantizers; weights are symmetric"""
    bias_correction: bool = True
    """NNCF fast bias correction after calibration"""
    overflow_fix: Literal["auto", "first_layer", "enable", "disable"] = "auto"
    """NNCF: 7-bit weights against u8*s8 overflow on CPUs without VNNI (first layer only, all layers,
    none); auto: the device decides (no VNNI/AMX: first_layer, NNCF's default; VNNI, AMX, ARM: disable)"""


def resolve_overflow_fix(config: Any, device: Device) -> Any:
    """``config`` with overflow_fix "auto" replaced by the device's setting (devices.Device.overflow_fix)."""
    if config.overflow_fix != "auto":
        return config
    return config.model_copy(update={"overflow_fix": device.overflow_fix})


def nncf_quantize_arguments(config: NNCFQuantizationConfig, samples: int, **advanced: Any) -> dict[str, Any]:
    """Keyword arguments of ``nncf.quantize`` for ``config`` on ``samples`` calibration batches: CPU
    target device, fast bias correction; ``advanced`` adds fields of AdvancedQuantizationParameters
    (range estimators, weight quantization parameters)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    assert config.overflow_fix != "auto", "the pass resolves overflow_fix for the device first"
    overflow = {"first_layer": OverflowFix.FIRST_LAYER, "enable": OverflowFix.ENABLE,
                "disable": OverflowFix.DISABLE}[config.overflow_fix]
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    return {
        "preset": preset[config.preset],
        "target_device": nncf.TargetDevice.CPU,
        "subset_size": samples,
        "fast_bias_correction": True,
        "advanced_parameters": AdvancedQuantizationParameters(
            overflow_fix=overflow, disable_bias_correction=not config.bias_correction, **advanced
        ),
    }
