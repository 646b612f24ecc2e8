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

    Its math (two groups, cost per sequence's own query length) is `apar_rt.export.attention_body`'s;
    ONNX Runtime's common-subexpression elimination computes the index math once per step.
    """
    from onnx import helper

    from apar_rt.export import attention_body as ab

    b = ab.Nodes()
    s = ab.step_index(b)
    sg, lg = ab.short_group(b, s), ab.long_group(b, s)
    outs = [ab.attend_standard(b, g.index, "q", "k", "v", "k_cache", "v_cache") for g in (sg, lg)]
    rows = ab.packed_rows(b, s, sg, lg)
    both = b.op("Concat", outs, axis=0)
    b.nodes.append(helper.make_node("CastLike", [b.op("Gather", [both, rows], axis=0), "q"], ["out"]))
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, list(OP_INPUTS), list(OP_OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[name for name, _ in OP_ATTRIBUTES])


def all_nodes(function) -> list:
    """Every node of a FunctionProto, those inside If branches included."""
    out, todo = [], list(function.node)
    while todo:
        n = todo.pop()
        out.append(n)
        for a in n.attribute:
            todo += [x for g in ([a.g] if a.HasField("g") else []) + list(a.graphs) for x in g.node]
    return out


def standard_op_types(function) -> set[tuple[str, str]]:
    """(domain, op_type) of every node in a FunctionProto, If branches included (checks, tests)."""
    return {(n.domain, n.op_type) for n in all_nodes(function)}


def attention_model(attrs: AttentionAttrs, dtype: str = "float32", opset: int = 18):
    """A model of one `apar.TreePagedAttention` node plus its local function (tests, benchmarks).

    Its inputs and output are the op's, named as in OP_INPUTS; q/k/v and the pools have `dtype`.
    """
    from onnx import TensorProto, helper

    ft = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    i32, b = TensorProto.INT32, TensorProto.BOOL
    H, Hkv, D = attrs.num_heads, attrs.num_kv_heads, attrs.head_size
    shapes = {"q": (ft, ["T", H, D]), "k": (ft, ["T", Hkv, D]), "v": (ft, ["T", Hkv, D]),
              "k_cache": (ft, ["NB", attrs.block_size, Hkv, D]), "v_cache": (ft, ["NB", attrs.block_size, Hkv, D]),
              "block_tables": (i32, ["B", "MB"]), "context_lens": (i32, ["B"]), "query_start": (i32, ["B1"]),
              "mask": (b, ["T", "MQ"])}
    inputs = [helper.make_tensor_value_info(n, *shapes[n]) for n in OP_INPUTS]
    node = helper.make_node(OP_TYPE, list(OP_INPUTS), ["out"], domain=OP_DOMAIN, **attrs.as_dict())
    graph = helper.make_graph([node], "tree_paged_attention", inputs,
                              [helper.make_tensor_value_info("out", ft, ["T", H, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(OP_DOMAIN, OP_DOMAIN_VERSION)],
                              functions=[attention_function(opset)])
    model.ir_version = 9
    return model
