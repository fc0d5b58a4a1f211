"""tensorrt: a serialized TensorRT engine built from an explicit-quantization (QDQ) ONNX graph.

Written against TensorRT's documented Python API (``tensorrt.Builder``, ``OnnxParser``,
optimization profiles, timing cache, DLA). TensorRT needs an NVIDIA GPU (or a Jetson) and its
own Python package; where either is missing, :meth:`availability` says which, and the target
still writes what the device needs (the QDQ ONNX and ``build_engine.sh`` with a ``trtexec`` line
and the project's own ``compress build-engine``); the pipeline marks the engine "not built here"
and measures the same ONNX graph on ONNX Runtime as the closest proxy for its accuracy.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .. import qdq_rules
from ..artifact import Form, ModelArtifact
from ..fidelity.tapper import LayerInfo, Tapper
from ..registry import register_target
from ..target_base import Availability, Engine, Runner, Target, TargetConfig
from .onnxruntime import OnnxTapper, OrtRunner


class TensorRTConfig(TargetConfig):
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    """int8: INT8 where the QDQ graph says so, FP16 fallback elsewhere"""
    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(default=64, ge=1)
    """optimization profile for the batch dimension"""
    workspace_mb: int = Field(default=1024, ge=16)
    """builder workspace memory limit"""
    timing_cache: str | None = None
    """path of a timing cache file to reuse and update"""
    dla_core: int | None = Field(default=None, ge=0)
    """Jetson: build for this DLA core, with GPU fallback"""


@register_target
class TensorRTTarget(Target):
    name = "tensorrt"
    summary = "TensorRT engine from QDQ ONNX (Jetson / NVIDIA GPUs)"
    Config = TensorRTConfig
    consumes = frozenset({Form.ONNX})
    libraries = ("tensorrt",)
    has_proxy = True

    @classmethod
    def availability(cls) -> Availability:
        try:
            import tensorrt as trt
        except ImportError:
            return Availability(False, "the tensorrt Python package is not installed (it ships with JetPack on Jetson; "
                                       "on x86 it comes from NVIDIA's package index)")
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except Exception:  # pragma: no cover - torch without CUDA runtime
            has_cuda = False
        if not has_cuda:
            return Availability(False, "no CUDA device on this machine")
        return Availability(True, f"TensorRT {trt.__version__}")

    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        import tensorrt as trt

        cfg = self.config
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert artifact.path is not None
        if not parser.parse_from_file(str(artifact.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected the graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
        if cfg.precision in ("int8", "fp16"):
            config.set_flag(trt.BuilderFlag.FP16)
        if cfg.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if cfg.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = cfg.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        inp = network.get_input(0)
        sample = tuple(artifact.input_spec.sample_shape)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (cfg.min_batch, *sample), (cfg.opt_batch, *sample), (cfg.max_batch, *sample))
        config.add_optimization_profile(profile)
        cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT's builder returned no engine (see its log above)")
        engine_path = tmp_dir / "model.engine"
        engine_path.write_bytes(bytes(serialized))
        if cache_path is not None:
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        return [engine_path], {"runtime_build": {"tensorrt": trt.__version__, "precision": cfg.precision,
                                                 "dla_core": cfg.dla_core}}

    def load(self, engine: Engine, *, threads: int) -> Runner:
        return TRTRunner(engine.path, threads=threads)

    # ------------------------------------------------------------------ not built here
    def trtexec_command(self, onnx_name: str, input_name: str, sample_shape: tuple[int, ...]) -> str:
        """The ``trtexec`` line that builds the same engine as :meth:`_build` on the device."""
        cfg = self.config
        dims = "x".join(str(d) for d in sample_shape)
        args = ["trtexec", f"--onnx={onnx_name}", "--saveEngine=model.engine",
                f"--minShapes={input_name}:{cfg.min_batch}x{dims}", f"--optShapes={input_name}:{cfg.opt_batch}x{dims}",
                f"--maxShapes={input_name}:{cfg.max_batch}x{dims}", f"--memPoolSize=workspace:{cfg.workspace_mb}M"]
        if cfg.precision in ("int8", "fp16"):
            args.append("--fp16")
        if cfg.precision == "int8":
            args.append("--int8")
        args.append(f"--timingCacheFile={cfg.timing_cache or 'timing.cache'}")
        if cfg.dla_core is not None:
            args += [f"--useDLACore={cfg.dla_core}", "--allowGPUFallback"]
        return " ".join(shlex.quote(a) for a in args)

    def _build_portable(self, artifact: ModelArtifact, tmp_dir: Path, reason: str) -> tuple[list[Path], dict[str, Any]]:
        import onnx

        assert artifact.path is not None
        model = tmp_dir / "model.onnx"
        shutil.copy2(artifact.path, model)
        proto = onnx.load(str(model))
        input_name = proto.graph.input[0].name
        trtexec = self.trtexec_command(model.name, input_name, tuple(artifact.input_spec.sample_shape))
        script = tmp_dir / "build_engine.sh"
        script.write_text(
            "#!/bin/sh\n"
            f"# Build the TensorRT engine on the device (Jetson / NVIDIA GPU). Not built where this was made:\n"
            f"# {reason}\n"
            "set -e\ncd \"$(dirname \"$0\")\"\n"
            "# with TensorRT's command-line tool:\n"
            f"{trtexec}\n"
            "# or, with compressor installed (same settings, through TensorRT's Python API):\n"
            "# compress build-engine .\n"
        )
        script.chmod(0o755)
        rules = qdq_rules.check(proto) if artifact.precision == "int8" else None
        info: dict[str, Any] = {"trtexec": trtexec, "build_command": "compress build-engine <engine directory>",
                                "input_name": input_name}
        if rules is not None:
            info["qdq_rules"] = rules.to_json()
        return [model, script], info

    def load_proxy(self, engine: Engine, *, threads: int) -> tuple[str, Runner]:
        return "onnxruntime", OrtRunner(engine.path, threads=threads)


    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        """The QDQ graph TensorRT builds from, on ONNX Runtime (a TensorRT engine keeps no names
        of intermediate tensors that map back here)."""
        tapper = OnnxTapper(engine.path.parent / "model.onnx", threads=threads)
        tapper.plan.note = "the QDQ ONNX graph TensorRT builds from, run on ONNX Runtime"
        return tapper


class TRTRunner(Runner):
    """Runs a serialized engine with torch CUDA tensors as its buffers."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        import tensorrt as trt
        import torch

        self.name = "tensorrt"
        self.threads = threads  # the host threads asked for: the engine itself runs on the GPU
        self._torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        inp = torch.from_numpy(x).cuda()
        self.context.set_input_shape(self.input, tuple(inp.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input, inp.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return out.cpu().numpy()

    def runtime_info(self) -> dict[str, Any]:
        import tensorrt as trt

        return {"runtime": f"tensorrt {trt.__version__}", "device": self._torch.cuda.get_device_name(),
                "threads": self.threads}
