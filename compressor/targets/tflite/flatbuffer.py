"""Flatbuffer tools of the tflite target: what a model holds (operators by type and tensor types),
and float32 input / output for a model the converter gave int8 ones."""

from __future__ import annotations

from collections import Counter
from typing import Any

def flatbuffer_summary(content: bytes) -> dict[str, Any]:
    """Operators of the main subgraph by type, and by type with their tensor types
    (``CONV_2D:INT8,INT8,INT32->INT8``), read from the flatbuffer with LiteRT's schema."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(content, 0)
    graph = model.Subgraphs(0)
    by_type: Counter[str] = Counter()
    by_dtype: Counter[str] = Counter()
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, str(builtin))
        if name == "CUSTOM" and code.CustomCode():
            name = f"CUSTOM:{code.CustomCode().decode()}"
        ins = [types.get(graph.Tensors(t).Type(), "?") for t in op.InputsAsNumpy() if t >= 0] \
            if op.InputsLength() else []
        outs = [types.get(graph.Tensors(t).Type(), "?") for t in op.OutputsAsNumpy()] if op.OutputsLength() else []
        by_type[name] += 1
        by_dtype[f"{name}:{','.join(ins)}->{','.join(outs)}"] += 1
    tensor_types: Counter[str] = Counter(types.get(graph.Tensors(i).Type(), "?") for i in range(graph.TensorsLength()))
    inp = graph.Tensors(graph.Inputs(0))
    out = graph.Tensors(graph.Outputs(0))
    return {
        "ops": graph.OperatorsLength(),
        "op_types": dict(by_type.most_common()),
        "op_dtypes": dict(by_dtype.most_common()),
        "tensor_types": dict(tensor_types.most_common()),
        "input": {"type": types.get(inp.Type()), "shape": inp.ShapeAsNumpy().tolist()},
        "output": {"type": types.get(out.Type()), "shape": out.ShapeAsNumpy().tolist()},
        "float_compute_ops": sum(n for k, n in by_dtype.items() if k.split(":")[0] in _COMPUTE and "->FLOAT32" in k),
    }


def float_io(content: bytes) -> tuple[bytes, bool]:
    """Give a model with quantized (int8) input/output float32 ones: a QUANTIZE op before the first
    op and a DEQUANTIZE op after the last, both with the tensors' own scales, which XNNPACK runs in
    the same partition. Returns the model and whether it changed."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    quantized = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16)
    changed = False

    def opcode(builtin: int, version: int) -> int:
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(index: int, suffix: str) -> int:
        old = graph.tensors[index]
        new = schema.TensorT()
        new.shape, new.shapeSignature, new.hasRank = list(old.shape), old.shapeSignature, old.hasRank
        new.type, new.name = schema.TensorType.FLOAT32, (old.name or b"") + suffix.encode()
        buffer = schema.BufferT()
        model.buffers.append(buffer)
        new.buffer = len(model.buffers) - 1
        graph.tensors.append(new)
        return len(graph.tensors) - 1

    def retarget(kind: str, old: int, new: int) -> None:
        for sig in model.signatureDefs or []:
            for m in getattr(sig, kind) or []:
                if m.tensorIndex == old:
                    m.tensorIndex = new

    for pos, index in enumerate(list(graph.inputs)):
        if graph.tensors[index].type in quantized:
            new = float_twin(index, "_float")
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.QUANTIZE, 2), [new], [index]
            graph.operators.insert(0, op)
            graph.inputs[pos] = new
            retarget("inputs", index, new)
            changed = True
    for pos, index in enumerate(list(graph.outputs)):
        if graph.tensors[index].type in quantized:
            new = float_twin(index, "_float")
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.DEQUANTIZE, 2), [index], [new]
            graph.operators.append(op)
            graph.outputs[pos] = new
            retarget("outputs", index, new)
            changed = True
    if not changed:
        return content, False
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), True


_COMPUTE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "MEAN", "SUM", "AVERAGE_POOL_2D",
            "MAX_POOL_2D", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONCATENATION"}
