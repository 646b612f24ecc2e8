"""The Medusa heads apart from the step graph, run only on the rows that draft.

An engine built with heads computes `medusa_logits` in its step graph, for every logits row of
every step: each node of a draft tree and the rows of requests that do not draft at all (sampled
requests under greedy acceptance). Drafting reads them at one row per drafting thread, the last
accepted node, as vLLM's Medusa proposer reads the target model's hidden states after
verification. `split_heads(model)` cuts the heads out when the backend loads the engine: the
step graph outputs the hidden states the heads read (the final hidden states at the logits rows)
in place of `medusa_logits`, and the heads become a graph of their own (hidden -> medusa_logits),
which the backend runs on the rows `medusa_topk` asks for. Same nodes, same weights (the heads'
initializers move over as they are, external-data references included); the engine file is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from apar_rt.backends.onnx_graph import drop_outputs, live, producers_and_uses, subgraph_reads


@dataclass
class HeadsSplit:
    """What `split_heads` made: the step graph's new output and the heads' own model."""

    hidden: str        # the step graph's output that replaces medusa_logits: the heads' input [N, hidden]
    heads: object      # onnx.ModelProto: hidden -> the medusa output


def split_heads(model, output: str, hidden_type: int) -> HeadsSplit | None:
    """Cut the nodes that only `output` needs out of `model` (a ModelProto, changed in place) into
    a model of their own, when they read exactly one value the rest of the graph makes (besides
    initializers and constants), of element type `hidden_type` (the model's dtype: onnx's
    TensorProto enum); else None, and `model` is unchanged."""
    from onnx import helper

    g = model.graph
    if output not in [o.name for o in g.output]:
        return None
    others = {o.name for o in g.output if o.name != output}
    shared_nodes, _ = live(list(g.node), others)
    shared = {id(n) for n in shared_nodes}
    heads_nodes = [n for n in live(list(g.node), {output})[0] if id(n) not in shared]
    made_inside = {o for n in heads_nodes for o in n.output}
    inits = {t.name: t for t in g.initializer}
    producer, _ = producers_and_uses(g.node)
    # what they read from outside, in order, once each
    reads = dict.fromkeys(i for n in heads_nodes for i in [*n.input, *sorted(subgraph_reads(n))]
                          if i and i not in made_inside)
    boundary, constants = [], []
    for name in reads:
        if name in inits:
            continue
        src = producer.get(name)
        if src is not None and src.op_type == "Constant":
            constants.append(src)
        else:
            boundary.append(name)
    if len(boundary) != 1 or boundary[0] in [i.name for i in g.input]:
        return None
    hidden = boundary[0]
    out_info = next(o for o in g.output if o.name == output)
    heads_graph = helper.make_graph(
        [*constants, *heads_nodes], "medusa_heads",
        [helper.make_tensor_value_info(hidden, hidden_type, None)],
        [out_info], [t for name, t in inits.items() if name in reads])
    heads = helper.make_model(heads_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # the step graph: `hidden` out instead of the heads' output, and nothing only the heads needed
    g.output.append(helper.make_tensor_value_info(hidden, hidden_type, None))
    drop_outputs(g, {output})
    return HeadsSplit(hidden, heads)
