"""The one artifact type that travels through the pipeline.

A :class:`ModelArtifact` names its *form* (eager/FX torch module, ``torch.export`` program,
ONNX graph, OpenVINO IR), holds the object or the file that carries it, and the metadata every
later stage needs: input spec, preprocessing, class names and lineage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ModelLoadError
from .fingerprints import update_with_file
from .preprocessing import Preprocessing
from .staging import json_text


class Form(str, Enum):
    """What an artifact holds. Passes and targets declare the forms they consume/produce."""

    TORCH = "torch"  # an nn.Module: eager, or an FX GraphModule (the torch-level graph IR)
    EXPORTED = "exported"  # a torch.export ExportedProgram
    ONNX = "onnx"  # an ONNX graph file (the graph-level IR)
    OPENVINO = "openvino"  # an OpenVINO IR (.xml/.bin)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value

    @property
    def a_model(self) -> str:
        """``a torch model``, ``an onnx model``: for messages."""
        return f"{'an' if self.value[0] in 'aeiou' else 'a'} {self.value} model"


class InputSpec(BaseModel):
    """Shape of one input batch, batch dimension first."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int] = Field(min_length=4, max_length=4)
    dtype: str = "float32"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    def with_batch(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.shape[1:])


TORCHSCRIPT_PAYLOAD = "model.torchscript.pt"
"""the file name :meth:`ModelArtifact.save` gives a TorchScript module (torch.jit.save)"""


class ModelArtifact:
    """A model in one form plus the metadata that travels with it.

    ``model`` holds in-memory forms (torch); ``path`` holds file forms (ONNX, OpenVINO).
    Artifacts are treated as immutable: passes return new ones (see :meth:`derive`).
    """

    def __init__(
        self,
        form: Form,
        *,
        model: Any = None,
        path: Path | None = None,
        input_spec: InputSpec,
        preprocessing: Preprocessing | None = None,
        classes: list[str] | None = None,
        lineage: list[dict[str, Any]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if (model is None) == (path is None) and form in (Form.TORCH, Form.EXPORTED):
            raise ValueError("a torch artifact holds a model object")
        if form in (Form.ONNX, Form.OPENVINO) and path is None:
            raise ValueError(f"a {form.value} artifact holds a file path")
        self.form = Form(form)
        self.model = model
        self.path = Path(path) if path is not None else None
        self.input_spec = input_spec
        self.preprocessing = preprocessing or Preprocessing()
        self.classes = list(classes) if classes else None
        self.lineage = list(lineage or [])
        self.meta = dict(meta or {})
        self._hash: str | None = None

    # ------------------------------------------------------------------ derived views
    @property
    def precision(self) -> str:
        return str(self.meta.get("precision", "fp32"))

    def derive(self, form: Form, *, model: Any = None, path: Path | None = None, **meta: Any) -> ModelArtifact:
        """A new artifact with the same metadata, a new payload and updated ``meta``."""
        new_meta = {**self.meta, **meta}
        return ModelArtifact(
            form,
            model=model,
            path=path,
            input_spec=self.input_spec,
            preprocessing=self.preprocessing,
            classes=self.classes,
            lineage=copy.deepcopy(self.lineage),
            meta=new_meta,
        )

    def torch_module(self) -> Any:
        """The payload as a callable nn.Module (an ExportedProgram is unlifted to one)."""
        if self.form is Form.TORCH:
            return self.model
        if self.form is Form.EXPORTED:
            return self.model.module()
        raise TypeError(f"a {self.form.value} artifact has no torch module")

    def files(self) -> list[Path]:
        """The files that carry a file-form artifact (e.g. .xml and .bin)."""
        if self.path is None:
            return []
        if self.form is Form.OPENVINO:
            return [self.path, self.path.with_suffix(".bin")]
        extra = [p for p in self.path.parent.glob(self.path.name + ".data")]
        return [self.path, *extra]

    # ------------------------------------------------------------------ hashing
    def content_hash(self) -> str:
        """A hash of the model's content (weights and structure) and its metadata."""
        if self._hash is None:
            h = hashlib.sha256()
            h.update(self.form.value.encode())
            h.update(self.input_spec.model_dump_json().encode())
            h.update(self.preprocessing.model_dump_json().encode())
            h.update(json.dumps(self.classes).encode())
            if self.form in (Form.TORCH, Form.EXPORTED):
                _hash_torch(h, self.model)
            else:
                for f in self.files():
                    h.update(f.name.encode())
                    update_with_file(h, f)
            self._hash = h.hexdigest()
        return self._hash

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """Write the artifact into ``directory`` (used by the pass cache)."""
        directory.mkdir(parents=True, exist_ok=True)
        payload: str | None = None
        if self.form is Form.TORCH:
            import torch

            if isinstance(self.model, torch.jit.ScriptModule):  # torch.save cannot pickle TorchScript
                payload = TORCHSCRIPT_PAYLOAD
                torch.jit.save(self.model, str(directory / payload))
            else:
                payload = "model.pt"
                torch.save(self.model, directory / payload)
        elif self.form is Form.EXPORTED:
            import torch

            payload = "model.pt2"
            torch.export.save(self.model, directory / payload)
        else:
            assert self.path is not None
            for f in self.files():
                shutil.copy2(f, directory / f.name)
            payload = self.path.name
        (directory / "artifact.json").write_text(json_text(self._describe(payload)))

    @classmethod
    def load(cls, directory: Path) -> ModelArtifact:
        desc = json.loads((directory / "artifact.json").read_text())
        form = Form(desc["form"])
        model, path = None, None
        if form is Form.TORCH:
            import torch

            if desc["payload"] == TORCHSCRIPT_PAYLOAD:
                model = torch.jit.load(str(directory / desc["payload"]), map_location="cpu")
            else:  # our own cache, written by save(): trusted
                model = torch.load(directory / desc["payload"], weights_only=False)
        elif form is Form.EXPORTED:
            import torch

            model = torch.export.load(directory / desc["payload"])
        else:
            path = directory / desc["payload"]
        return cls(
            form,
            model=model,
            path=path,
            input_spec=InputSpec(**desc["input_spec"]),
            preprocessing=Preprocessing(**desc["preprocessing"]),
            classes=desc["classes"],
            lineage=desc["lineage"],
            meta=desc["meta"],
        )

    def _describe(self, payload: str | None) -> dict[str, Any]:
        return {
            "form": self.form.value,
            "payload": payload,
            "input_spec": self.input_spec.model_dump(),
            "preprocessing": self.preprocessing.model_dump(),
            "classes": self.classes,
            "lineage": self.lineage,
            "meta": self.meta,
            "hash": self.content_hash(),
        }

    def __repr__(self) -> str:
        where = self.path if self.path is not None else type(self.model).__name__
        return f"ModelArtifact(form={self.form.value}, {where}, precision={self.precision})"


def quantized_input(model: ModelArtifact) -> str | None:
    """Why ``model`` is already quantized (its metadata, QDQ/integer ONNX ops, fake quantizers), or None."""
    if model.precision == "int8":
        return "its metadata says precision int8"
    if model.form is Form.ONNX and model.path is not None:
        try:
            import onnx

            ops = {n.op_type for n in onnx.load(str(model.path), load_external_data=False).graph.node}
        except Exception:  # unreadable here: the passes will say so
            return None
        found = sorted(ops & QUANTIZED_ONNX_OPS)
        if found:
            return f"its ONNX graph has {', '.join(found)} nodes"
    if model.form is Form.TORCH and model.model is not None and hasattr(model.model, "modules"):
        for m in model.model.modules():
            kind = type(m)
            if kind.__name__ != "FloatFunctional" and kind.__module__.startswith(QUANTIZED_TORCH_MODULES):
                return f"it holds quantized or fake-quantized modules ({kind.__name__})"
    return None


QUANTIZED_TORCH_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                           "torch.ao.quantization.fake_quantize", "nncf.")
QUANTIZED_ONNX_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                                "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})


def _hash_torch(h: Any, model: Any) -> None:
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        h.update(str(model.graph_module.code).encode())
        state = model.state_dict
    else:
        h.update(type(model).__qualname__.encode())
        h.update(repr(model).encode())
        code = getattr(model, "code", None)  # FX GraphModule
        if isinstance(code, str):
            h.update(code.encode())
        state = model.state_dict()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def eval_mode(module: Any) -> Any:
    """``module.eval()`` where the module allows it. The module a torch.export program unpacks to
    (``ExportedProgram.module()``) refuses ``eval()``; it runs as it was exported: as it is."""
    if not hasattr(module, "eval"):
        return module
    try:
        return module.eval()
    except NotImplementedError:
        return module


def plain_graph_module(gm: Any) -> Any:
    """The FX graph module an ExportedProgram unpacks to (``ep.module()``), as a plain GraphModule
    of the same graph: without its input-guard submodule and the hooks that cannot be pickled (the
    pass cache saves torch models with torch.save). A program exported at a static batch keeps it
    through the artifact's ``fixed_batch``."""
    import torch

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    return torch.fx.GraphModule(gm, gm.graph).eval()


def state_dict_bytes(model: Any) -> bytes:
    """A torch model's state dict as ``torch.save`` writes it."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def file_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def require_file(path: Path, what: str = "model file") -> Path:
    if not path.exists():
        raise ModelLoadError(f"{what} not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"{what} is not a file: {path}")
    return path
