"""The PT2E toolkit of the tflite target: a quantizer that leaves chosen modules and ops in float,
and the fix-ups a torch.export capture needs before litert-torch's PT2EQuantizer reads it."""

from __future__ import annotations

from typing import Any

_MOVES = {"max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d", "avg_pool2d", "flatten", "view", "reshape",
          "permute", "squeeze", "unsqueeze", "getitem", "hardtanh", "relu", "relu6", "dropout", "mean"}


TRANSFORMER_FLOAT_OPS = ("add", "cat", "concat", "mul")
"""aten ops that ``model_type: transformer`` leaves unannotated, as NNCF's transformer mode keeps them in
float: the residual adds, and the concatenation of ViT's class token with the patch tokens, whose one
INT8 scale crushes the class token the classifier reads. The LiteRT converter still makes that
concatenation an INT8 CONCATENATION (its input from the patch embedding is INT8, the class token a
constant): on a 224x224 ViT of 4 layers the head's SQNR stays at 13.7 dB where the blocks' are 28.7"""


def keeping_quantizer(keep: tuple[str, ...], ops: tuple[str, ...] = ()) -> Any:
    """A litert_torch PT2EQuantizer that leaves the nodes of the ``keep`` modules and the aten ``ops``
    unannotated (they then run in float), and with them the data-movement ops whose only input is
    such a node (which the quantizer would otherwise quantize with their input's scale)."""
    from litert_torch.quantize import pt2e_quantizer

    from ...fidelity.naming import aten_layer_name, stack_path

    wanted = set(keep)

    def module_of(node: Any) -> set[str]:
        names = {stack_path(value) for value in (node.meta.get("nn_module_stack") or {}).values()}
        layer = aten_layer_name(node)  # a graph that kept no module names (TorchScript): its weight's
        return names | {layer} if layer else names

    class Keeping(pt2e_quantizer.PT2EQuantizer):
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            stripped: set[Any] = set()
            for node in model.graph.nodes:
                if module_of(node) & wanted or (node.op == "call_function" and _op_name(node) in ops):
                    node.meta.pop("quantization_annotation", None)
                    stripped.add(node)
            changed = True
            while changed:
                changed = False
                for node in model.graph.nodes:
                    if node in stripped or node.op != "call_function":
                        continue
                    name = _op_name(node)
                    inputs = [a for a in node.args if hasattr(a, "op")]
                    if name in _MOVES and inputs and all(a in stripped for a in inputs):
                        node.meta.pop("quantization_annotation", None)
                        stripped.add(node)
                        changed = True
            return model

    return Keeping()


def _op_name(node: Any) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def to_eval(module: Any) -> None:
    """Put a converted PT2E graph in eval mode (plain .eval() is refused on exported graphs)."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(module)
    except Exception:  # only silences litert-torch's "converted in training mode" warning
        pass
    module.training = False


def tag_sources(graph_module: Any) -> None:
    """Non-strict torch.export records no ``source_fn_stack``; litert-torch's PT2EQuantizer finds
    add / mul / cat / pooling partitions by it. Tag those aten nodes as strict export would."""
    import operator

    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    sources = {
        aten.add.Tensor: operator.add, aten.add_.Tensor: operator.add,
        aten.mul.Tensor: operator.mul, aten.mul_.Tensor: operator.mul,
        aten.cat.default: torch.cat,
        aten.max_pool2d.default: F.max_pool2d, aten.max_pool2d_with_indices.default: F.max_pool2d,
        aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    }
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in sources and not node.meta.get("source_fn_stack"):
            node.meta["source_fn_stack"] = [(node.name, sources[node.target])]
