"""Model intake: every supported file kind becomes a :class:`ModelArtifact`.

Supported: a whole pickled ``nn.Module`` (``torch.save(model)``, only with ``trust=True``),
TorchScript, a ``torch.export`` program (.pt2), a state dict plus ``arch``, and ONNX.
A JSON file beside the model (``model.json``) may give input shape, preprocessing and classes.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from .artifact import Form, InputSpec, ModelArtifact, Preprocessing, require_file
from .errors import ModelLoadError, TargetError, first_line, validation_message
from .preprocessing import describe as describe_geometry
from .preprocessing import output_size, size_problem

log = logging.getLogger(__name__)

SAFE_FORMS_HINT = (
    "save it in a safe form instead: torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), "
    "torch.jit.save(torch.jit.script(model), 'model.ts'), torch.onnx.export(...), "
    "or torch.save(model.state_dict(), 'weights.pt') with --arch torchvision:NAME --num-classes N"
)


def sidecar_metadata(path: Path) -> dict[str, Any]:
    """Read ``<model>.json`` beside the model, if any (input_shape, preprocessing, classes)."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model metadata {side} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"model metadata {side} must be a JSON object")
    prep = meta.get("preprocessing")
    if prep is not None:  # checked here, so that a bad value is named by its field, not met passes later
        if not isinstance(prep, dict):
            raise ModelLoadError(f"model metadata {side}: preprocessing must be an object (scale, mean, std)")
        try:
            Preprocessing(**_preprocessing_fields(prep))
        except ValidationError as exc:
            raise ModelLoadError(f"model metadata {side}: {validation_message(exc, 'preprocessing')}") from None
    return meta


def build_arch(arch: str, num_classes: int | None) -> Any:
    """``torchvision:resnet50`` -> an untrained torchvision model with ``num_classes`` outputs."""
    provider, _, name = arch.partition(":")
    if provider != "torchvision" or not name:
        raise ModelLoadError(f"unknown arch {arch!r}: expected 'torchvision:NAME', e.g. torchvision:resnet50")
    import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        raise ModelLoadError(f"unknown arch {arch!r}: torchvision has no classification model named {name!r}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _load_torch_file(path: Path, *, arch: str | None, num_classes: int | None, trust: bool) -> tuple[Form, Any]:
    import pickle

    import torch

    names = _zip_names(path)
    if path.suffix == ".pt2" or any(n.endswith("archive_format") for n in names):
        try:
            return Form.EXPORTED, torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot load torch.export program {path}: {first_line(exc)}") from exc
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        try:
            return Form.TORCH, torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot load TorchScript model {path}: {first_line(exc)}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked, unsupported = _pickle_globals(exc)
        if blocked is None and unsupported is None:  # not a pickle of classes: a damaged file
            raise ModelLoadError(f"model file {path} is corrupt or not a torch file: {_torch_reason(exc)}") from None
        if not trust:
            if blocked is not None:
                raise ModelLoadError(
                    f"{path} references {blocked}, which is not a torch or nn.Module class: unpickling the file "
                    f"would run it; not loaded (only if you trust the file, --trust-model loads it and runs "
                    f"{blocked})") from None
            what = ("a pickled nn.Module" if unsupported.startswith(("torch.", "torchvision."))
                    else f"a pickle that references {unsupported}")
            raise ModelLoadError(
                f"{path} is {what} and loading it runs code from the file; "
                f"pass --trust-model (or model.trusted: true in the recipe) if you trust it, or {SAFE_FORMS_HINT}"
            ) from None
        if blocked is not None:  # the user's explicit call: say what it will run
            log.warning("%s references %s, which is not a model class: --trust-model unpickles it, which runs it",
                        path, blocked)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelLoadError(f"cannot unpickle model {path}: {_torch_reason(exc2)}") from exc2
    except Exception as exc:
        raise ModelLoadError(f"model file {path} is corrupt or not a torch file: {_torch_reason(exc)}") from None

    if isinstance(obj, torch.nn.Module):
        return Form.TORCH, obj
    if isinstance(obj, dict):
        state = _find_state_dict(obj)
        if state is None:
            raise ModelLoadError(f"{path} holds a dict that is not a state dict (no tensors found)")
        if not arch:
            raise ModelLoadError(
                f"{path} is a state dict: say which architecture it belongs to with --arch torchvision:NAME "
                "(and --num-classes N)"
            )
        if num_classes is None:
            num_classes = _infer_num_classes(state)
        model = build_arch(arch, num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # torch's first line names no key: name them from the two key sets
            detail = _state_dict_mismatch(model.state_dict(), state) or first_line(exc)
            raise ModelLoadError(f"state dict {path} does not fit {arch}: {detail}") from exc
        return Form.TORCH, model
    raise ModelLoadError(f"{path} holds an object of type {type(obj).__name__}, not a model or a state dict")


_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")


def _pickle_globals(exc: BaseException) -> tuple[str | None, str | None]:
    """From torch's weights-only refusal: (a global of a module torch never loads, e.g. posix.system;
    a global outside the tensor types, e.g. a model class). Both None: the file is no such pickle."""
    text = str(exc)
    blocked = _BLOCKED_GLOBAL.search(text)
    unsupported = _UNSUPPORTED_GLOBAL.search(text)
    return (blocked.group(1) if blocked else None), (unsupported.group(1).rstrip(".") if unsupported else None)


def _torch_reason(exc: BaseException) -> str:
    """torch.load's message without its advice to re-run with weights_only=False (the tool's advice for a
    file the user trusts is --trust-model) and without its links: the line that says what went wrong."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("Weights only load failed"):
            continue  # the hint: "Re-running torch.load with weights_only set to False will likely succeed ..."
        if line.startswith(("Check the documentation of torch.load", "Please file an issue with the following")):
            continue
        line = line.removeprefix("WeightsUnpickler error:").strip()
        if line:
            lines.append(line)
    if not lines and isinstance(exc, EOFError):
        return "the file ends too early (empty or truncated)"
    text = lines[0] if lines else type(exc).__name__
    return text[:300]


def _state_dict_mismatch(want: dict, got: dict) -> str:
    """The first missing, unexpected and mis-shaped keys of ``got`` against the model's ``want``, or ''."""
    missing = [k for k in want if k not in got and not k.endswith("num_batches_tracked")]  # torch fills these
    unexpected = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and tuple(want[k].shape) != tuple(getattr(got[k], "shape", ()))]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) > 1)} (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} (first: {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} key{'s' * (len(shapes) > 1)} of another shape (first: {k} is "
                     f"{list(got[k].shape)} in the file, {list(want[k].shape)} in the model)")
    return "; ".join(parts)


def _find_state_dict(obj: dict) -> dict | None:
    import torch

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model_state_dict", "model", "weights"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None


def _infer_num_classes(state: dict) -> int | None:
    """The output width of the last 2-D weight (the classifier), if there is one."""
    last = None
    for value in state.values():
        if getattr(value, "ndim", 0) == 2:
            last = value
    return int(last.shape[0]) if last is not None else None


def _onnx_input_shape(path: Path) -> list[int] | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelLoadError(f"{path} has {len(inputs)} inputs; an image classifier has exactly one")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shape


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust: bool = False,
    input_shape: list[int] | None = None,
    preprocessing: Preprocessing | None = None,
    classes: list[str] | None = None,
    fallback_shape: list[int] | Callable[[str], list[int] | None] | None = None,
    fallback_source: str = "data",
    output: int | str | None = None,
) -> ModelArtifact:
    """Load a model file of any supported kind; check it runs on its input shape.

    The input shape comes from, in this order: the model itself (a static ONNX or torch.export
    input), ``input_shape`` (the recipe's model.input_shape), the ``model.json`` beside the file,
    and last ``fallback_shape`` (a shape, or a function of the colour mode, "RGB", "BGR" or "L", that
    gives one or None; e.g. the data's image size), named ``fallback_source``. Where it came from
    is kept in ``meta["input_shape_source"]``: "model", "recipe", "model.json" or the fallback's.

    Weights must be finite. A torch model whose forward returns several outputs (a tuple, a dict)
    is refused unless ``output`` (the recipe's model.output: an index, a key or a field name) says
    which one is the logits; the model is then wrapped to return that one.
    """
    path = require_file(Path(path))
    side = sidecar_metadata(path)
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            onnx.checker.check_model(str(path))
            graph_shape = _onnx_input_shape(path)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
        form, model, file_path = Form.ONNX, None, path
    else:
        form, model = _load_torch_file(path, arch=arch, num_classes=num_classes, trust=trust)
        file_path, graph_shape = None, None
        if hasattr(model, "eval"):
            model.eval()

    if form is Form.EXPORTED:
        graph_shape = _exported_input_shape(model)
    prep = preprocessing or (Preprocessing(**_preprocessing_fields(side.get("preprocessing") or {})) if side else None)
    if prep is None:
        log.warning("no preprocessing given for %s: using scale 1/255 and no mean/std", path)
    shape, shape_source = _input_shape(path, _static_shape(graph_shape), input_shape, side.get("input_shape"),
                                       fallback_shape, fallback_source, prep or Preprocessing())
    shape = [1, *list(shape)[1:]]
    if prep is not None and (problem := size_problem(prep, (shape[2], shape[3]))):
        where = "the recipe" if preprocessing is not None else path.with_suffix(".json").name
        raise ModelLoadError(f"{problem} (input shape {shape} given by the {shape_source}, preprocessing by {where})")
    if prep is not None:
        log.info("preprocessing%s: %s", f" (from {prep.origin})" if prep.origin else "", describe_geometry(prep))
    check_finite(model if form is not Form.ONNX else path, form)
    if form is Form.ONNX:
        if output is not None:
            raise ModelLoadError(f"model.output is {output!r}, but it picks an output of a torch model only; "
                                 f"{path} is ONNX, whose first output is taken: leave model.output out")
    else:
        model = select_output(model, form, output, shape)
    artifact = ModelArtifact(
        form,
        model=model,
        path=file_path,
        input_spec=InputSpec(shape=shape),
        preprocessing=prep,
        classes=classes or side.get("classes"),
        meta={"precision": "fp32", "source_file": str(path), "source_size_bytes": path.stat().st_size,
              "input_shape_source": shape_source},
    )
    artifact.meta["num_outputs"] = probe_output_width(artifact)
    return artifact


def _input_shape(path: Path, own: list[int] | None, recipe: list[int] | None, side: list[int] | None,
                 fallback: Any, fallback_source: str, prep: Preprocessing) -> tuple[list[int], str]:
    """(shape, where it came from): the model's own static shape, the recipe's, model.json's, the size
    the preprocessing crops or resizes to ("preprocessing"), the fallback's."""
    color = prep.color
    given = [(s, name) for s, name in ((recipe, "recipe"), (side, path.with_suffix(".json").name)) if s]
    if own is not None:
        for s, name in given:  # a static graph takes its own shape only: a different one is a mistake
            if list(s)[1:] != list(own)[1:]:
                field = "model.input_shape in the recipe" if name == "recipe" else f"input_shape in {name}"
                raise ModelLoadError(f"{field} is {list(s)}, but {path} takes input {list(own)}: give its shape "
                                     "or leave it out")
        return list(own), "model"
    if given:
        return list(given[0][0]), "recipe" if given[0][1] == "recipe" else "model.json"
    fixed = output_size(prep)
    if fixed is not None:
        return [1, 1 if color == "L" else 3, *fixed], "preprocessing"
    shape = fallback(color) if callable(fallback) else fallback
    if shape is not None:
        return list(shape), fallback_source
    side_name = path.with_suffix(".json").name
    data = ", nor the data (images of one size)" if fallback_source == "data" else ""
    raise ModelLoadError(
        f"input shape of {path} is unknown: neither the file, the recipe, a {side_name} beside it{data} gives "
        f"one; give model.input_shape in the recipe (e.g. [1, 3, 224, 224]) or a {side_name} beside the model"
    )


def _exported_input_shape(program: Any) -> list[int] | None:
    """The one user input's shape in a torch.export program (-1 for a symbolic dimension)."""
    try:
        names = set(program.graph_signature.user_inputs)
        nodes = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
        if len(nodes) != 1:
            return None
        return [d if isinstance(d, int) else -1 for d in nodes[0].meta["val"].shape]
    except Exception:  # no example values recorded: the shape is not known from the file
        return None


def _static_shape(shape: list[int] | None) -> list[int] | None:
    if shape is None or len(shape) != 4 or any(d <= 0 for d in shape[1:]):
        return None
    return shape


def _preprocessing_fields(prep: dict) -> dict:
    """The keys of model.json's preprocessing that Preprocessing takes (its fields and ``from``)."""
    fields = {*Preprocessing.model_fields, "from"}
    return {k: v for k, v in prep.items() if k in fields}


def probe_output_width(artifact: ModelArtifact) -> int:
    """Run zero batches through the model: it must accept its input shape and give (N, classes).

    A model that takes batch 1 but not batch 2 (e.g. a torch.export program traced with a static
    batch) is marked ``fixed_batch: 1`` so runners feed it one sample at a time.
    """
    try:
        out = _forward_zeros(artifact, 2)
    except ModelLoadError:
        raise
    except Exception:
        try:
            out = _forward_zeros(artifact, 1)
        except ModelLoadError:
            raise
        except Exception as exc:
            shape = list(artifact.input_spec.with_batch(1))
            raise ModelLoadError(f"the model rejects input shape {shape}: {first_line(exc)}") from exc
        artifact.meta["fixed_batch"] = 1
    if out.ndim != 2:
        raise ModelLoadError(f"the model's output has shape {list(out.shape)}; a classifier gives (batch, classes)")
    return int(out.shape[1])


def _forward_zeros(artifact: ModelArtifact, batch: int) -> Any:
    import numpy as np

    shape = artifact.input_spec.with_batch(batch)
    if artifact.form is Form.ONNX:
        from .ort_session import cpu_session

        sess = cpu_session(artifact.path)
        return sess.run(None, {sess.get_inputs()[0].name: np.zeros(shape, np.float32)})[0]
    import torch

    with torch.inference_mode():
        out = artifact.torch_module()(torch.zeros(shape))
    if not isinstance(out, torch.Tensor):
        from .output_select import describe

        raise ModelLoadError(f"the model returns {describe(out)}; compressor needs one logits tensor "
                             "(batch, classes)")
    return out.numpy()


def check_finite(model: Any, form: Form) -> None:
    """Refuse NaN or infinite weights (they end in a quantizer's assertion or NaN logits passes later),
    naming the first parameter or buffer (ONNX: initializer) that holds one. ``model`` is the path of
    an ONNX model."""
    import numpy as np

    for kind, name, values in _weights(model, form):
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            nan, inf = int(np.isnan(values).sum()), int(bad.sum()) - int(np.isnan(values).sum())
            what = " and ".join(w for w, n in (("NaN", nan), ("infinite", inf)) if n)
            raise ModelLoadError(
                f"the model's weights are not finite: {kind} {name!r} holds {int(bad.sum())} {what} value"
                f"{'s' * (int(bad.sum()) > 1)} (of {values.size}); a model with NaN or infinite weights cannot be "
                "calibrated, quantized or measured: fix or retrain it"
            )


def _weights(model: Any, form: Form) -> Any:
    """(kind, name, values as a numpy array) of every weight tensor, parameters first."""
    if form is Form.ONNX:
        import onnx
        from onnx import numpy_helper

        for init in onnx.load(str(model)).graph.initializer:
            yield "initializer", init.name, numpy_helper.to_array(init)
        return
    import torch

    def array(t: Any) -> Any:
        t = t.detach()
        return (t.float() if t.is_floating_point() and t.dtype in (torch.bfloat16, torch.float16) else t).cpu().numpy()

    named = [("parameter", model.named_parameters()), ("buffer", model.named_buffers())]
    if form is Form.EXPORTED:
        named.append(("constant", model.constants.items()))
    for kind, items in named:
        for name, t in items:
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                yield kind, name, array(t)


def select_output(model: Any, form: Form, output: int | str | None, shape: list[int]) -> Any:
    """``model`` when its forward returns one tensor; wrapped in SelectOutput where it returns several
    and ``output`` picks one; refused (naming what it returns and what is needed) where none does."""
    import torch

    module = model.module() if form is Form.EXPORTED else model
    try:
        with torch.inference_mode():
            out = module(torch.zeros(shape))
    except Exception:  # the probe that follows says what the model rejects
        return model
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list, dict)):
        if output is not None and isinstance(out, torch.Tensor):
            raise ModelLoadError(f"model.output is {output!r}, but the model returns one tensor "
                                 f"{list(out.shape)}: leave model.output out")
        return model
    from .output_select import SelectOutput, describe, resolve

    if output is None:
        example = ("logits" if "logits" in out else next(iter(out), "logits")) if isinstance(out, dict) else 0
        raise ModelLoadError(
            f"the model returns {describe(out)}; compressor needs one logits tensor (batch, classes): say which "
            f"output holds the logits with model.output in the recipe (e.g. model.output: {example}), or save a "
            "model whose forward returns the logits only")
    picked, why = resolve(out, output)
    if picked is None:
        raise ModelLoadError(f"model.output {output!r} {why}: the model returns {describe(out)}")
    wrapper = SelectOutput(module, *picked)
    wrapper.training = False  # not .eval(): an exported program's module refuses train()
    example = torch.zeros(shape)
    if form is Form.EXPORTED:
        try:  # a dynamic batch where the model allows one, as for any exported classifier
            batch = torch.export.Dim("batch", min=1)
            return torch.export.export(wrapper, (torch.zeros([2, *shape[1:]]),), dynamic_shapes=({0: batch},))
        except Exception:
            return torch.export.export(wrapper, (example,))
    if isinstance(model, torch.jit.ScriptModule):  # stays TorchScript: what the passes take from this form
        return torch.jit.trace(wrapper, example)
    return wrapper


def torchscript_to_export(module: Any, sample: Any) -> Any:
    """A TorchScript module as the FX graph module of an equivalent torch.export program (for
    backends that convert only those, e.g. litert-torch). Raises what the converter raises."""
    import torch
    from torch._export.converter import TS2EPConverter

    from .artifact import plain_graph_module

    # frozen first (conv+BN folded: PT2E would otherwise match its conv-BN patterns for a
    # long while), and without the program's batch-1 guard: the TorchScript module took any
    # batch, and PT2E calibrates in batches
    frozen = torch.jit.freeze(module.eval())
    return plain_graph_module(TS2EPConverter(frozen, (sample,)).convert().module())


def torchscript_for_target(target: str, module: Any, sample: Any) -> Any:
    """:func:`torchscript_to_export` for a target that converts only torch.export programs, its
    failure said as that target's (TargetError)."""
    try:
        return torchscript_to_export(module, sample)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise TargetError(f"{target}: the TorchScript model cannot be converted to a torch.export program "
                          f"(the target converts only those): {reason}; give an nn.Module or a .pt2 instead") from exc
