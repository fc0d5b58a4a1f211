"""export_onnx: torch -> ONNX (torch.onnx, dynamo exporter by default), simplified with onnxslim
and checked with ``onnx.checker``. The batch dimension stays dynamic."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Literal

from ..artifact import Form, ModelArtifact
from ..pass_base import Pass, PassConfig, PassContext, PassResult
from ..registry import register_pass

log = logging.getLogger(__name__)


class ExportOnnxConfig(PassConfig):
    opset: int = 18
    """ONNX opset version"""
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    """auto: dynamo (torch.export based), torchscript for TorchScript models and where dynamo fails
    (the report's metrics name the exporter used and dynamo's error)"""
    dynamic_batch: bool = True
    """keep the batch dimension symbolic"""
    simplify: bool = True
    """run onnxslim (constant folding, redundant node removal)"""


@register_pass
class ExportOnnx(Pass):
    name = "export_onnx"
    summary = "export to ONNX, simplify with onnxslim, check with onnx.checker"
    Config = ExportOnnxConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED})
    produces = Form.ONNX
    libraries = ("torch", "onnx", "onnxslim", "onnxscript")

    def accepts(self, form: Form) -> bool:
        if self.config.exporter == "torchscript":  # it traces nn.Modules only
            return form is Form.TORCH
        return form in self.consumes

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        import onnx
        import torch

        cfg = self.config
        path = ctx.work_dir / "model.onnx"
        model = artifact.model
        example = (torch.zeros(artifact.input_spec.with_batch(1)),)
        exporter = cfg.exporter
        qat = bool(artifact.meta.get("qat"))  # NNCF fake quantizers export as Q/DQ pairs with TorchScript only
        if exporter == "auto":
            exporter = "torchscript" if isinstance(model, torch.jit.ScriptModule) or qat else "dynamo"
            fallback = exporter == "dynamo"
        else:
            fallback = False
        dynamo_error = None
        if exporter == "dynamo":
            if isinstance(model, torch.jit.ScriptModule):
                raise ValueError("the dynamo exporter cannot take a TorchScript model; use exporter: torchscript")
            if qat:
                raise ValueError("the dynamo exporter cannot trace NNCF's fake quantizers (a quantize_qat model); "
                                 "use exporter: torchscript")
            dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if cfg.dynamic_batch else None
            try:
                with _quiet():
                    program = torch.onnx.export(
                        model, example, dynamo=True, opset_version=cfg.opset, dynamic_shapes=dyn,
                        input_names=["input"], output_names=["logits"], verbose=False,
                    )
                program.save(str(path), external_data=False)
            except Exception as exc:  # noqa: BLE001 - exporter: auto tries the TorchScript exporter next
                if not fallback:
                    raise
                dynamo_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
                log.warning("export_onnx: the dynamo exporter failed (%s); exporting with TorchScript instead",
                            dynamo_error)
                exporter = "torchscript"
        if exporter == "torchscript":
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if cfg.dynamic_batch else None
            with _quiet():
                torch.onnx.export(
                    model, example, str(path), dynamo=False, opset_version=min(cfg.opset, 17),
                    input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                )
        proto = onnx.load(str(path))
        before = len(proto.graph.node)
        if cfg.simplify:
            import onnxslim

            with _quiet():
                proto = onnxslim.slim(proto)
            onnx.save(proto, str(path))
        ops: dict[str, int] = {}
        for node in proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        metrics = {"exporter": exporter, "opset": cfg.opset if exporter == "dynamo" else min(cfg.opset, 17),
                   **({"dynamo_error": dynamo_error} if dynamo_error else {}), "nodes_exported": before,
                   "nodes": len(proto.graph.node), "ops": dict(sorted(ops.items()))}
        return PassResult(artifact.derive(Form.ONNX, path=path), metrics)

    def ensures(self, before: ModelArtifact, result: PassResult, ctx: PassContext) -> None:
        import onnx

        onnx.checker.check_model(str(result.artifact.path), full_check=True)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress to stdout; keep it out of the user's console (debug log)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.debug("exporter said:\n%s", buf.getvalue())
