"""Tiny ONNX models built in code for the tests (onnx.helper, opset 17)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers, name="tiny") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lrdeploy-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def random_weight(d_in: int, d_out: int, seed: int = 0, rank: int | None = None) -> np.ndarray:
    """A [d_in, d_out] weight, optionally of exact rank `rank`."""
    rng = np.random.default_rng(seed)
    if rank is None:
        return (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    return (rng.standard_normal((d_in, rank)) @ rng.standard_normal((rank, d_out)) / np.sqrt(d_in * rank)).astype(np.float32)


def matmul_add(d_in=64, d_out=96, bias_first=False, with_bias=True, weight=None, dtype=np.float32, seed=0,
               transposed_weight=False, bias_value=None) -> onnx.ModelProto:
    """x[N, d_in] ─MatMul(W)─[Add(b)]─► y[N, d_out]; bias on either side of the Add; optional Transpose(Wᵀ)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = (random_weight(d_in, d_out, seed) if weight is None else weight).astype(dtype)
    rng = np.random.default_rng(seed + 1)
    b = (rng.standard_normal(d_out) if bias_value is None else bias_value).astype(dtype)
    nodes, inits = [], []
    if transposed_weight:
        inits.append(_init("W_t", w.T.copy()))
        nodes.append(helper.make_node("Transpose", ["W_t"], ["W"], name="transpose_w", perm=[1, 0]))
    else:
        inits.append(_init("W", w))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["xw" if with_bias else "y"], name="fc"))
    if with_bias:
        inits.append(_init("b", b))
        nodes.append(helper.make_node("Add", ["b", "xw"] if bias_first else ["xw", "b"], ["y"], name="fc_bias"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", elem, ["N", d_in])],
        [helper.make_tensor_value_info("y", elem, ["N", d_out])],
        inits,
    )


def gemm(d_in=64, d_out=96, trans_b=0, alpha=1.0, beta=1.0, seed=0) -> onnx.ModelProto:
    """x[N, d_in] ─Gemm(B, C)─► y[N, d_out] with B stored as [d_in, d_out] or, with transB, [d_out, d_in]."""
    w = random_weight(d_in, d_out, seed)
    c = np.random.default_rng(seed + 1).standard_normal(d_out).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    return _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d_out])],
        [_init("B", w.T.copy() if trans_b else w), _init("C", c)],
    )


def activation_matmul() -> onnx.ModelProto:
    """a[N, 32] · b[32, 48]: no constant weight, so nothing to factorize."""
    return _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="act_mm")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 32]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [32, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])],
        [],
    )


def transformer(layers=2, hidden=64, heads=4, ffn=256, vocab=100, seed=0, pre_ln=False) -> onnx.ModelProto:
    """A small BERT-like encoder: embeddings, `layers` post-LN blocks (attention + GELU FFN), mean pooling. With
    `pre_ln`, ViT/GPT-style blocks: each branch reads LayerNorm(h) and adds to the residual stream h, one final
    LayerNorm after the last block.

    Inputs input_ids and attention_mask [batch, seq] (int64); outputs last_hidden_state and embedding.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, value):
        inits.append(_init(name, np.asarray(value)))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x, d_in, d_out, name):
        w = const(f"{name}.weight", (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32))
        b = const(f"{name}.bias", (0.1 * rng.standard_normal(d_out)).astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{name}/MatMul"), b], f"{name}/Add")

    def layer_norm(x, name):
        g = const(f"{name}.gamma", np.ones(hidden, np.float32))
        b = const(f"{name}.beta", np.zeros(hidden, np.float32))
        return node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=1e-5)

    head_dim = hidden // heads
    emb = const("embeddings.word", rng.standard_normal((vocab, hidden)).astype(np.float32))
    h = layer_norm(node("Gather", [emb, "input_ids"], "embeddings/Gather"), "embeddings/LayerNorm")
    mask_f = node("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.FLOAT)
    bias_mask = node("Mul", [node("Sub", [const("one", np.float32(1.0)), mask_f], "mask/Sub"),
                             const("neg", np.float32(-1e4))], "mask/Mul")
    bias_mask = node("Unsqueeze", [bias_mask, const("axes12", np.array([1, 2], np.int64))], "mask/Unsqueeze")
    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, hidden], np.int64))
    for i in range(layers):
        p = f"layer{i}"
        stream = h
        if pre_ln:
            h = layer_norm(stream, f"{p}/attention/LayerNorm")

        def heads_of(t, tag):
            return node("Transpose", [node("Reshape", [t, split_shape], f"{p}/{tag}/Reshape")], f"{p}/{tag}/Transpose",
                        perm=[0, 2, 1, 3])

        q = heads_of(linear(h, hidden, hidden, f"{p}/attention/query"), "q")
        k = heads_of(linear(h, hidden, hidden, f"{p}/attention/key"), "k")
        v = heads_of(linear(h, hidden, hidden, f"{p}/attention/value"), "v")
        kt = node("Transpose", [k], f"{p}/kt", perm=[0, 1, 3, 2])
        scores = node("Div", [node("MatMul", [q, kt], f"{p}/scores/MatMul"),
                              const(f"{p}.scale", np.float32(np.sqrt(head_dim)))], f"{p}/scores/Div")
        probs = node("Softmax", [node("Add", [scores, bias_mask], f"{p}/scores/Add")], f"{p}/Softmax", axis=-1)
        context = node("MatMul", [probs, v], f"{p}/context/MatMul")
        context = node("Reshape", [node("Transpose", [context], f"{p}/context/Transpose", perm=[0, 2, 1, 3]),
                                   merge_shape], f"{p}/context/Reshape")
        attn = linear(context, hidden, hidden, f"{p}/attention/output")
        if pre_ln:
            stream = node("Add", [attn, stream], f"{p}/attention/residual")
            h = layer_norm(stream, f"{p}/output/LayerNorm")
        else:
            h = layer_norm(node("Add", [attn, h], f"{p}/attention/residual"), f"{p}/attention/LayerNorm")
        up = linear(h, hidden, ffn, f"{p}/intermediate")
        gelu = node("Mul", [up, node("Add", [const(f"{p}.one", np.float32(1.0)), node(
            "Erf", [node("Div", [up, const(f"{p}.sqrt2", np.float32(np.sqrt(2.0)))], f"{p}/gelu/Div")], f"{p}/gelu/Erf")],
            f"{p}/gelu/Add")], f"{p}/gelu/Mul1")
        gelu = node("Mul", [gelu, const(f"{p}.half", np.float32(0.5))], f"{p}/gelu/Mul2")
        down = linear(gelu, ffn, hidden, f"{p}/output")
        if pre_ln:
            h = node("Add", [down, stream], f"{p}/output/residual")
        else:
            h = layer_norm(node("Add", [down, h], f"{p}/output/residual"), f"{p}/output/LayerNorm")
    if pre_ln:
        h = layer_norm(h, "final/LayerNorm")
    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="output/Identity"))
    mask3 = node("Unsqueeze", [mask_f, const("axis2", np.array([2], np.int64))], "pool/Unsqueeze")
    summed = node("ReduceSum", [node("Mul", [h, mask3], "pool/Mul"), const("axis1", np.array([1], np.int64))],
                  "pool/ReduceSum", keepdims=0)
    counts = node("ReduceSum", [mask3, const("axis1b", np.array([1], np.int64))], "pool/Count", keepdims=0)
    nodes.append(helper.make_node("Div", [summed, counts], ["embedding"], name="pool/Div"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        inits,
        name="tiny_transformer",
    )


def transformer_inputs(count=64, seq=16, vocab=100, seed=0, min_len=4) -> dict[str, np.ndarray]:
    """Token ids and right-padded attention masks of random lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(count, seq), dtype=np.int64)
    lengths = rng.integers(min_len, seq + 1, size=count)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def pooled_encoder(opset: int = OPSET, hidden=64, ffn=256, vocab=100, seed=0) -> onnx.ModelProto:
    """A token-embedding encoder written for `opset` (11 and up): Gather → two MatMul+Add layers with Relu →
    masked mean pooling, inputs input_ids and attention_mask like the transformer's. Below opset 13 Unsqueeze
    and ReduceSum take their axes as attributes, from 13 on as inputs."""
    rng = np.random.default_rng(seed)
    inits = [_init("emb", rng.standard_normal((vocab, hidden)).astype(np.float32)),
             _init("w1", random_weight(hidden, ffn, seed + 1)), _init("b1", np.zeros(ffn, np.float32)),
             _init("w2", random_weight(ffn, hidden, seed + 2)), _init("b2", np.zeros(hidden, np.float32))]
    axes_as_input = opset >= 13
    if axes_as_input:
        inits += [_init("axis1", np.array([1], np.int64)), _init("axis2", np.array([2], np.int64))]

    def axes(op, inputs, output, values, **attrs):
        if axes_as_input:
            return helper.make_node(op, [*inputs, f"axis{values[0]}"], [output], name=output, **attrs)
        return helper.make_node(op, inputs, [output], name=output, axes=values, **attrs)

    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["up_mm"], name="up"), helper.make_node("Add", ["up_mm", "b1"], ["up_b"], name="up_bias"),
        helper.make_node("Relu", ["up_b"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w2"], ["down_mm"], name="down"), helper.make_node("Add", ["down_mm", "b2"], ["h"], name="down_bias"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
        axes("Unsqueeze", ["mask_f"], "mask3", [2]),
        helper.make_node("Mul", ["h", "mask3"], ["masked"], name="mask_mul"),
        axes("ReduceSum", ["masked"], "summed", [1], keepdims=0),
        axes("ReduceSum", ["mask3"], "counts", [1], keepdims=0),
        helper.make_node("Div", ["summed", "counts"], ["embedding"], name="pool"),
    ]
    graph = helper.make_graph(
        nodes, "pooled_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lrdeploy-tests")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def ffn(w_up: np.ndarray, b_up: np.ndarray, w_down: np.ndarray, b_down: np.ndarray, activation: str = "Relu",
        ) -> onnx.ModelProto:
    """x[n, d] ─MatMul(W_up)─Add(b_up)─ activation ─MatMul(W_down)─Add(b_down)─► y (one FFN block, float32)."""
    d, f = w_up.shape
    inits = [_init("w_up", w_up.astype(np.float32)), _init("b_up", b_up.astype(np.float32)),
             _init("w_down", w_down.astype(np.float32)), _init("b_down", b_down.astype(np.float32)),
             _init("half", np.float32(0.5)), _init("one", np.float32(1.0)), _init("sqrt2", np.float32(np.sqrt(2.0)))]
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["up_mm"], name="up"),
             helper.make_node("Add", ["up_mm", "b_up"], ["up_out"], name="up_bias")]
    if activation == "Gelu":  # erf GELU as torch exports it: x · 0.5 · (1 + erf(x / √2))
        nodes += [helper.make_node("Div", ["up_out", "sqrt2"], ["scaled"], name="gelu_div"),
                  helper.make_node("Erf", ["scaled"], ["erf"], name="gelu_erf"),
                  helper.make_node("Add", ["erf", "one"], ["erf1"], name="gelu_add"),
                  helper.make_node("Mul", ["up_out", "erf1"], ["gelu_mul"], name="gelu_mul"),
                  helper.make_node("Mul", ["gelu_mul", "half"], ["act"], name="gelu_half")]
    else:
        nodes.append(helper.make_node(activation, ["up_out"], ["act"], name="act"))
    nodes += [helper.make_node("MatMul", ["act", "w_down"], ["down_mm"], name="down"),
              helper.make_node("Add", ["down_mm", "b_down"], ["y"], name="down_bias")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w_down.shape[1]])], inits, name="ffn")


def silence_block(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    """Zero both residual branches of one block of `transformer` (attention output and FFN down, weights and
    biases), in place: the block then only re-normalises an already normalised stream (LayerNorm with γ=1, β=0),
    so dropping it changes nothing."""
    for init in model.graph.initializer:
        if init.name.startswith((f"layer{layer}/attention/output.", f"layer{layer}/output.")):
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    return model
