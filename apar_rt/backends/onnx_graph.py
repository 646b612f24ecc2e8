"""Reading and pruning ONNX graphs, for the onnxruntime backend's load-time passes
(`onnxruntime_backend._session_model`, `ort_rotary`, `ort_norms`, `ort_attention`).

One definition each of: the small constants a pattern matcher compares against, a Cast's target
type, who makes and how often each value is read (If branches' reads of outer values count),
which nodes are still needed for a set of outputs, and dropping outputs with what only they need.
"""

from __future__ import annotations


def constants(graph) -> dict:
    """Small constant tensors by name (Constant nodes and inline initializers of rank <= 1)."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for t in graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and t.name not in out and len(t.dims) <= 1:
            out[t.name] = numpy_helper.to_array(t)
    return out


def cast_to(cast) -> int:
    """The element type a Cast node casts to."""
    from onnx import helper

    return helper.get_attribute_value(next(a for a in cast.attribute if a.name == "to"))


def subgraph_reads(node) -> set[str]:
    """Every name the subgraphs of `node` (If branches, at any depth) read: outer names among them."""
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in sub.node:
                reads.update(n.input)
                reads |= subgraph_reads(n)
    return reads


def producers_and_uses(nodes) -> tuple[dict, dict[str, int]]:
    """({value: the node making it}, {value: how many nodes read it}) over `nodes`; a node whose
    If branches read an outer value counts once for it."""
    producer = {o: n for n in nodes for o in n.output}
    uses: dict[str, int] = {}
    for n in nodes:
        for i in [*n.input, *subgraph_reads(n)]:
            uses[i] = uses.get(i, 0) + 1
    return producer, uses


def live(nodes, needed: set[str]) -> tuple[list, set[str]]:
    """The nodes of `nodes` (in topological order) that `needed`'s values depend on, in order, and
    every name they read (`needed` included): one backward pass."""
    needed = set(needed)
    kept = []
    for node in reversed(nodes):
        if any(o and o in needed for o in node.output):   # "" is an optional output left out
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed |= subgraph_reads(node)
    kept.reverse()
    return kept, needed


def drop_outputs(g, drop: set[str]) -> None:
    """Remove outputs `drop` from graph `g`, and the nodes and initializers only they needed."""
    keep = [o for o in g.output if o.name not in drop]
    del g.output[:]
    g.output.extend(keep)
    nodes, needed = live(g.node, {o.name for o in keep})
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
