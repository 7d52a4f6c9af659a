"""Export trained heads as one ONNX graph, the file the runtime loads (edge_spade.heads.OnnxHeads)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .heads_train import LayerHead

ONNX_OPSET = 17


def export_onnx(heads: list[LayerHead], norm_weight: np.ndarray, eps: float, dtype=np.float16) -> bytes:
    """One ONNX graph holding every layer's head.

    Inputs: `hidden` float32 (1, d) and `layer` int64 scalar (the index into `heads`).
    Output: `normed` float32 (1, d), the head's FinalNorm output; the caller applies the
    decision-set rows of the output matrix (the decision set changes per question).
    Weights are stored as `dtype` (fp16 halves the file) and cast to float32 in the graph.
    """
    d = heads[0].b.shape[0]
    inits = [
        numpy_helper.from_array(np.stack([h.v.T for h in heads]).astype(dtype), "vt_all"),  # (L, d, r)
        numpy_helper.from_array(np.stack([h.u.T for h in heads]).astype(dtype), "ut_all"),  # (L, r, d)
        numpy_helper.from_array(np.stack([h.b for h in heads]).astype(dtype), "b_all"),  # (L, d)
        numpy_helper.from_array(norm_weight.astype(np.float32), "norm_weight"),
        numpy_helper.from_array(np.array(eps, np.float32), "eps"),
    ]
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gather", ["vt_all", "layer"], ["vt_h"], axis=0),
        helper.make_node("Gather", ["ut_all", "layer"], ["ut_h"], axis=0),
        helper.make_node("Gather", ["b_all", "layer"], ["b_h"], axis=0),
        helper.make_node("Cast", ["vt_h"], ["vt"], to=f32),
        helper.make_node("Cast", ["ut_h"], ["ut"], to=f32),
        helper.make_node("Cast", ["b_h"], ["b"], to=f32),
        helper.make_node("MatMul", ["hidden", "vt"], ["t"]),
        helper.make_node("MatMul", ["t", "ut"], ["a"]),
        helper.make_node("Add", ["hidden", "a"], ["ha"]),
        helper.make_node("Add", ["ha", "b"], ["y"]),
        helper.make_node("Mul", ["y", "y"], ["y2"]),
        helper.make_node("ReduceMean", ["y2"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["y", "rms"], ["yn"]),
        helper.make_node("Mul", ["yn", "norm_weight"], ["normed"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lspade_heads",
        [
            helper.make_tensor_value_info("hidden", f32, [1, d]),
            helper.make_tensor_value_info("layer", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("normed", f32, [1, d])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="edge-spade")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
