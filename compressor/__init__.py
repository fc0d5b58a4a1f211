"""compressor: a compression and optimization compiler for trained image classifiers.

Importing this package loads no runtime (OpenVINO, ONNX Runtime, TensorRT, LiteRT): backends
are imported when a pass or target runs.
"""

from .artifact import Form, InputSpec, ModelArtifact, Preprocessing
from .errors import (
    AcceptanceError,
    CompressorError,
    ConfigError,
    DataError,
    ModelLoadError,
    PassError,
    PipelineOrderError,
    TargetError,
    TargetUnavailable,
)
from .pass_base import Pass, PassConfig, PassContext, PassResult
from .pipeline import PassCache, Pipeline
from .records import RunResult
from .registry import get_pass, get_target, pass_registry, register_pass, register_target, target_registry
from .target_base import Engine, Runner, Target

__all__ = [
    "AcceptanceError", "CompressorError", "ConfigError", "DataError", "Engine", "Form", "InputSpec",
    "ModelArtifact", "ModelLoadError", "Pass", "PassCache", "PassConfig", "PassContext", "PassError",
    "PassResult", "Pipeline", "PipelineOrderError", "Preprocessing", "RunResult", "Runner", "Target",
    "TargetError", "TargetUnavailable", "get_pass", "get_target", "pass_registry", "register_pass",
    "register_target", "target_registry",
]
