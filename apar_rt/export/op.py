"""`apar.TreePagedAttention` in ONNX: the one place that names the op, and its standard-op body.

The node carries the attributes a TensorRT plugin creator reads (head counts, head size, block
size, scale) plus `plugin_namespace`/`plugin_version`, which the TensorRT ONNX parser uses to
find our plugin. The model also carries a model-local FunctionProto of the same domain and name,
written only in default-domain ONNX ops, that computes exactly the reference
(`apar_rt.ops.tree_attention.tree_paged_attention_reference`): ONNX Runtime (and TensorRT
without the plugin) inline it.
"""

from __future__ import annotations

from dataclasses import dataclass

OP_DOMAIN = "apar"
OP_TYPE = "TreePagedAttention"
OP_DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "apar"
PLUGIN_VERSION = "1"
# The op's inputs and output, in order (the reference's argument order).
OP_INPUTS = ("q", "k", "v", "k_cache", "v_cache", "block_tables", "context_lens", "query_start", "mask")
OP_OUTPUTS = ("out",)
# Node attributes: (name, ONNX attribute kind). Ints and floats are the plugin's fields.
OP_ATTRIBUTES = (("plugin_namespace", "s"), ("plugin_version", "s"), ("num_heads", "i"),
                 ("num_kv_heads", "i"), ("head_size", "i"), ("block_size", "i"), ("scale", "f"))


@dataclass(frozen=True, slots=True)
class AttentionAttrs:
    """The values of one TreePagedAttention node's attributes."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    scale: float

    def as_dict(self) -> dict:
        return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_size": self.head_size, "block_size": self.block_size, "scale": float(self.scale)}


def make_symbolic(attrs: AttentionAttrs):
    """A TorchScript-exporter symbolic for `apar::tree_paged_attention` emitting our node.

    The scale comes from the traced call; the other attributes from the model config.
    """

    def symbolic(g, q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale):
        from torch.onnx import symbolic_helper

        s = symbolic_helper._maybe_get_const(scale, "f")
        d = attrs.as_dict()
        out = g.op(f"{OP_DOMAIN}::{OP_TYPE}", q, k, v, k_cache, v_cache, block_tables, context_lens,
                   query_start, mask,
                   plugin_namespace_s=d["plugin_namespace"], plugin_version_s=d["plugin_version"],
                   num_heads_i=d["num_heads"], num_kv_heads_i=d["num_kv_heads"], head_size_i=d["head_size"],
                   block_size_i=d["block_size"], scale_f=float(s))
        out.setType(q.type())
        return out

    return symbolic


def attention_function(opset: int):
    """The model-local FunctionProto `apar.TreePagedAttention`, in default-domain ops only.

    Mirrors the reference step by step: pad each sequence's new tokens to [B, max_q], gather the
    cached K/V through the block tables, run a float32 softmax over the visible slots (masked with
    float32's lowest value), and scatter the rows back to packed order, cast like q. Unlike the
    reference it relies on the contract's finite pool contents instead of zeroing unseen slots.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes: list = []
    counter = [0]

    def op(op_type, inputs, n_out=1, **attrs):
        counter[0] += 1
        outs = [f"{op_type.lower()}_{counter[0]}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(name, values, dtype=TensorProto.INT64):
        nodes.append(helper.make_node("Constant", [], [name],
                                      value=helper.make_tensor(name, dtype, [len(values)], values)))
        return name

    def scalar(name, value, dtype):
        tensor = helper.make_tensor(name, dtype, [], [value])
        nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    i0, i1, i2, i3 = (const(f"c{i}", [i]) for i in range(4))
    zero, one = scalar("zero", 0, TensorProto.INT64), scalar("one", 1, TensorProto.INT64)
    fmin = scalar("fmin", float.fromhex("-0x1.fffffep+127"), TensorProto.FLOAT)  # float32's lowest
    minus1 = const("cm1", [-1])
    big = const("cbig", [2 ** 62])
    # scale comes from the node's attribute
    scale_node = helper.make_node("Constant", [], ["scale_c"])
    scale_node.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT,
                                                          ref_attr_name="scale"))
    nodes.append(scale_node)

    def dim(x, axis):  # a [1] int64 tensor holding x.shape[axis]
        return op("Shape", [x], start=axis, end=axis + 1)

    def sdim(x, axis):  # the same as a scalar
        return op("Squeeze", [dim(x, axis), i0])

    # Index math reads only the step inputs shared by every layer (T from mask, not q), so that
    # after inlining, ONNX Runtime's common-subexpression elimination computes it once per step.
    def attr_int(name):  # a [1] int64 constant from the node's int attribute `name`
        node = helper.make_node("Constant", [], [f"{name}_s"])
        node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=name))
        nodes.append(node)
        return op("Unsqueeze", [f"{name}_s", i0])

    T = dim("mask", 0)
    Hq, Hkv, D, BS = (attr_int(a) for a in ("num_heads", "num_kv_heads", "head_size", "block_size"))
    B, MB = dim("block_tables", 0), dim("block_tables", 1)
    MQ = dim("mask", 1)
    L = op("Mul", [MB, BS])
    group = op("Div", [Hq, Hkv])

    # Padded per-sequence views of the new tokens: [B, max_q].
    qs = op("Cast", ["query_start"], to=TensorProto.INT64)
    q_start = op("Slice", [qs, i0, minus1, i0])                       # [B]
    q_end = op("Slice", [qs, i1, big, i0])                            # [B]
    q_len = op("Sub", [q_end, q_start])
    j = op("Range", [zero, sdim("mask", 1), one])                     # [max_q]
    new_idx = op("Add", [op("Unsqueeze", [q_start, i1]), op("Unsqueeze", [j, i0])])
    t_last = op("Max", [op("Sub", [T, i1]), i0])
    new_idx = op("Min", [new_idx, t_last])                            # [B, max_q]
    new_valid = op("Less", [op("Unsqueeze", [j, i0]), op("Unsqueeze", [q_len, i1])])

    # Keys and values each sequence can see: cached positions, then its new tokens.
    ctx = op("Cast", ["context_lens"], to=TensorProto.INT64)
    pos = op("Range", [zero, op("Squeeze", [L, i0]), one])          # [L]
    ctx_vis = op("Less", [op("Unsqueeze", [pos, i0]), op("Unsqueeze", [ctx, i1])])   # [B, L]
    kv_shape = op("Concat", [B, L, Hkv, D], axis=0)
    kc = op("Reshape", [op("Gather", ["k_cache", "block_tables"], axis=0), kv_shape])
    vc = op("Reshape", [op("Gather", ["v_cache", "block_tables"], axis=0), kv_shape])
    keys = op("Cast", [op("Concat", [kc, op("Gather", ["k", new_idx], axis=0)], axis=1)],
              to=TensorProto.FLOAT)                                   # [B, K, Hkv, D], K = L + max_q
    vals = op("Cast", [op("Concat", [vc, op("Gather", ["v", new_idx], axis=0)], axis=1)],
              to=TensorProto.FLOAT)
    # No zeroing of unseen slots: the contract keeps pool contents finite, so their probability of
    # exactly 0 removes them (zeroing cost a quarter of a decode step on the CPU).

    # Visibility for each padded query row: [B, max_q, L + max_q].
    new_vis = op("And", [op("Gather", ["mask", new_idx], axis=0), op("Unsqueeze", [new_valid, i1])])
    ctx_rows = op("Expand", [op("Unsqueeze", [ctx_vis, i1]), op("Concat", [B, MQ, L], axis=0)])
    vis = op("Concat", [ctx_rows, new_vis], axis=2)

    # Scores per (kv head, group member): query head h = kv * group + g.
    qp = op("Cast", [op("Gather", ["q", new_idx], axis=0)], to=TensorProto.FLOAT)
    qp = op("Reshape", [qp, op("Concat", [B, MQ, Hkv, group, D], axis=0)])
    qp = op("Transpose", [qp], perm=[0, 2, 3, 1, 4])                  # [B, Hkv, G, max_q, D]
    kt = op("Unsqueeze", [op("Transpose", [keys], perm=[0, 2, 3, 1]), i2])   # [B, Hkv, 1, D, K]
    scores = op("Mul", [op("MatMul", [qp, kt]), "scale_c"])           # [B, Hkv, G, max_q, K]
    vis5 = op("Unsqueeze", [vis, op("Concat", [i1, i2], axis=0)])     # [B, 1, 1, max_q, K]
    scores = op("Where", [vis5, scores, fmin])
    probs = op("Softmax", [scores], axis=-1)
    vt = op("Unsqueeze", [op("Transpose", [vals], perm=[0, 2, 1, 3]), i2])   # [B, Hkv, 1, K, D]
    out = op("Transpose", [op("MatMul", [probs, vt])], perm=[0, 3, 1, 2, 4])  # [B, max_q, Hkv, G, D]
    out = op("Reshape", [out, op("Concat", [op("Mul", [B, MQ]), Hq, D], axis=0)])  # [B*max_q, Hq, D]

    # Scatter the valid padded rows back to packed order.
    t = op("Range", [zero, sdim("mask", 0), one])                    # [T]
    before = op("LessOrEqual", [op("Unsqueeze", [q_end, i0]), op("Unsqueeze", [t, i1])])   # [T, B]
    seq = op("ReduceSum", [op("Cast", [before], to=TensorProto.INT64), i1], keepdims=0)     # [T]
    pos_in_seq = op("Sub", [t, op("Gather", [q_start, seq], axis=0)])
    row = op("Add", [op("Mul", [seq, op("Squeeze", [MQ, i0])]), pos_in_seq])
    nodes.append(helper.make_node("CastLike", [op("Gather", [out, row], axis=0), "q"], ["out"]))

    return helper.make_function(
        OP_DOMAIN, OP_TYPE, list(OP_INPUTS), list(OP_OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[name for name, _ in OP_ATTRIBUTES])


def standard_op_types(function) -> set[tuple[str, str]]:
    """(domain, op_type) of every node in a FunctionProto (for checks and tests)."""
    return {(n.domain, n.op_type) for n in function.node}
