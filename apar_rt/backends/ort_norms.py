"""Residual add + RMSNorm as ONNX Runtime's CPU backend runs them: one fused node.

The exporter writes each RMSNorm after a residual add as standard ops (float32 engines):

    s = Add(a, b);  c = Cast(s, FLOAT);  out = Mul(gamma, Cast(Mul(c, Div(1, Sqrt(Add(ReduceMean(Pow(c, 2)), eps))))))

and the next residual add reads `c`. onnxruntime fuses the norm into SimplifiedLayerNormalization
but leaves the add beside it (its SkipLayerNorm fusion wants 3-D activations; these are
[tokens, hidden]). `fuse_skip_rms_norm(model)` replaces each such chain with
`com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma)`, whose outputs are the norm and the
sum (named `c`, which the next add reads): one node instead of two after onnxruntime's own fusion,
and one pass over the activations. Only that exact pattern, with every intermediate read by the
chain alone, is matched; the engine file on disk is unchanged (this runs on load, on the CPU).
"""

from __future__ import annotations

from apar_rt.backends.onnx_graph import cast_to, constants, producers_and_uses


def _scalar(consts: dict, name: str) -> float | None:
    v = consts.get(name)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _match(mul_g, producer: dict, consts: dict, uses: dict, initializers: set):
    """The chain ending in `mul_g` (Mul(gamma, normalised)): (a, b, gamma, eps, c, its nodes) or None."""
    from onnx import TensorProto, helper

    def one(name, op):   # the node `op` making `name`, read once
        n = producer.get(name)
        return n if n is not None and n.op_type == op and uses.get(name) == 1 else None

    def cast_to_float(n):
        return n is not None and n.op_type == "Cast" and cast_to(n) == TensorProto.FLOAT

    if mul_g.op_type != "Mul":
        return None
    for gamma, x in (mul_g.input, mul_g.input[::-1]):
        while gamma not in initializers and producer.get(gamma) is not None and producer[gamma].op_type == "Identity":
            gamma = producer[gamma].input[0]   # a weight the exporter shared with another (equal) one
        if gamma not in initializers:
            continue
        cast1 = producer.get(x)
        mul = one(cast1.input[0], "Mul") if cast_to_float(cast1) and uses.get(x) == 1 else one(x, "Mul")
        if mul is None:
            continue
        for c, d in (mul.input, mul.input[::-1]):
            div = one(d, "Div")
            if div is None or _scalar(consts, div.input[0]) != 1.0:
                continue
            sqrt = one(div.input[1], "Sqrt")
            add_eps = one(sqrt.input[0], "Add") if sqrt is not None else None
            if add_eps is None:
                continue
            r, eps_name = add_eps.input if add_eps.input[1] in consts else add_eps.input[::-1]
            eps = _scalar(consts, eps_name)
            mean = one(r, "ReduceMean")
            if eps is None or mean is None:
                continue
            axes = (consts.get(mean.input[1]) if len(mean.input) > 1 else
                    next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "axes"), None))
            keep = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
            if axes is None or list(map(int, axes)) != [-1] or keep != 1:
                continue
            pow_ = one(mean.input[0], "Pow")
            if pow_ is None or pow_.input[0] != c or _scalar(consts, pow_.input[1]) != 2.0:
                continue
            cast0 = producer.get(c)
            add = producer.get(cast0.input[0]) if cast_to_float(cast0) and uses.get(cast0.input[0]) == 1 else cast0
            if add is None or add.op_type != "Add" or len(add.input) != 2:
                continue
            nodes = [n for n in (add, cast0, pow_, mean, add_eps, sqrt, div, mul, cast1, mul_g)
                     if n is not None and n.op_type in ("Add", "Cast", "Pow", "ReduceMean", "Sqrt", "Div", "Mul")]
            return add.input[0], add.input[1], gamma, eps, c, list({id(n): n for n in nodes}.values())
    return None


def fuse_skip_rms_norm(model) -> int:
    """Replace every residual add + RMSNorm chain of `model`'s main graph (a ModelProto, changed
    in place) with SkipSimplifiedLayerNormalization; returns how many."""
    from onnx import helper

    g = model.graph
    consts = constants(g)
    producer, uses = producers_and_uses(g.node)
    initializers = {t.name for t in g.initializer}
    matches = [(mul_g, m) for mul_g in g.node if (m := _match(mul_g, producer, consts, uses, initializers))]
    replace, dead = {}, set()
    for k, (mul_g, (a, b, gamma, eps, c, nodes)) in enumerate(matches):
        replace[id(mul_g)] = helper.make_node("SkipSimplifiedLayerNormalization", [a, b, gamma],
                                              [mul_g.output[0], "", "", c], name=f"apar/skip_rms_norm_{k}",
                                              domain="com.microsoft", epsilon=eps)
        dead.update(id(n) for n in nodes if n is not mul_g)
    if not matches:
        return 0
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(matches)
