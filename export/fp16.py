"""Convert an fp32 ONNX graph to fp16 with fp32 inputs and outputs, for TensorRT's strongly typed builds.

TensorRT 11 removed the FP16 builder flag: a network runs in the types its ONNX file declares, so fp16 has to be
in the graph. NVIDIA's tool for that is ModelOpt AutoCast, which cannot be installed on these machines; this is
the small equivalent our graphs need: weights and constants become fp16, Cast targets follow, the graph
boundary stays fp32 (callers feed the same arrays as to the fp32 bundle), and a few numerically fragile ops
(KEEP_FP32) are computed in fp32 between casts. A graph that does not type-check afterwards is an error naming
the problem, never a silently wrong engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
# ReduceL2 is F.normalize's norm: a sum of squares of raw embeddings can exceed fp16's 65504.
KEEP_FP32 = frozenset({"ReduceL2"})
FP16_MAX = 65504.0
FP16_TINY = 5.96e-8  # smallest fp16 subnormal: smaller non-zero weights (e.g. normalize's eps) would become 0


def to_fp16(array: np.ndarray) -> np.ndarray:
    """Clamp finite values into fp16's range (keeping tiny non-zeros non-zero), then cast; infinities stay."""
    a = array.astype(np.float32)
    finite = np.isfinite(a)
    tiny = finite & (a != 0) & (np.abs(a) < FP16_TINY)
    a = np.where(tiny, np.copysign(FP16_TINY, a), a)
    a = np.where(finite, np.clip(a, -FP16_MAX, FP16_MAX), a)
    return a.astype(np.float16)


def convert_to_fp16(src: Path, dst: Path, keep_fp32: frozenset[str] = KEEP_FP32) -> Path:
    """Write the fp16 version of `src` to `dst` (weights as external data `dst.name + ".data"`)."""
    model = onnx.load(str(src))  # with its external data
    ir_version = model.ir_version
    graph = model.graph
    types = _elem_types(model)

    for i, init in enumerate(graph.initializer):
        if init.data_type == F32:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(to_fp16(numpy_helper.to_array(init)), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == F32:
                attr.t.CopyFrom(numpy_helper.from_array(to_fp16(numpy_helper.to_array(attr.t)), attr.t.name))
            elif attr.type == AttributeProto.GRAPH:
                raise ValueError(f"{src.name}: node {node.name} ({node.op_type}) has a subgraph; not supported")
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == F32:
                attr.i = F16

    nodes: list[onnx.NodeProto] = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == F32:  # fp32 in, cast once at the boundary
            nodes.append(helper.make_node("Cast", [inp.name], [f"{inp.name}__fp16"], to=F16,
                                          name=f"{inp.name}__to_fp16"))
            _rename_input_uses(graph.node, inp.name, f"{inp.name}__fp16")
            types[f"{inp.name}__fp16"] = F32  # "a float tensor" for the KEEP_FP32 pass below
    for node in graph.node:
        if node.op_type not in keep_fp32:
            nodes.append(node)
            continue
        for j, name in enumerate(node.input):  # fp32 compute between casts
            if name and types.get(name) == F32:
                nodes.append(helper.make_node("Cast", [name], [f"{name}__fp32_{j}_{node.name}"], to=F32))
                node.input[j] = f"{name}__fp32_{j}_{node.name}"
        back = []
        for j, name in enumerate(node.output):
            if types.get(name) == F32:
                node.output[j] = f"{name}__fp32"
                back.append(helper.make_node("Cast", [f"{name}__fp32"], [name], to=F16))
        nodes.extend([node, *back])
    for out in graph.output:
        if out.type.tensor_type.elem_type == F32:  # fp16 inside, fp32 out
            for node in nodes:
                node.output[:] = [f"{out.name}__fp16" if o == out.name else o for o in node.output]
            _rename_input_uses(nodes, out.name, f"{out.name}__fp16")
            nodes.append(helper.make_node("Cast", [f"{out.name}__fp16"], [out.name], to=F32,
                                          name=f"{out.name}__to_fp32"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale fp32 annotations; shape inference below rebuilds what it needs
    model.ir_version = ir_version  # never let a helper bump it: ORT rejects newer IR versions (stack.md)

    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"{src.name}: the fp16 conversion does not type-check ({e}); an op here needs fp32 "
                         f"inputs: add it to KEEP_FP32") from e
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=f"{dst.name}.data")
    return dst


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name in the fp32 graph (inputs, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _rename_input_uses(nodes: Iterable[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        if old in node.input:
            node.input[:] = [new if name == old else name for name in node.input]
