"""ONNX Runtime CPU sessions, made one way for the whole package: the ONNX Runtime runner and tapper,
the accuracy budget's scoring of candidate graphs, and the intake's check of a model's output."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def session_options(threads: int | None = None) -> Any:
    """Quiet options (errors only in the log); with ``threads``: that many intra-op threads and one
    inter-op thread (a classifier's graph is a chain: no branch to run beside another)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def cpu_session(model: str | Path | bytes, opts: Any = None) -> Any:
    """An InferenceSession of ``model`` (a file, or a serialized ModelProto) on the CPU provider only."""
    import onnxruntime as ort

    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts or session_options(),
                                providers=["CPUExecutionProvider"])
