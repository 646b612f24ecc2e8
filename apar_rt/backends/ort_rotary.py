"""Rotary embeddings as ONNX Runtime's CPU backend runs them: one fused node per q and k.

The exported graph applies RoPE as `apar_rt.model.llama.apply_rope` writes it:

    y = x * cos + Gather(x, half_swap, axis=-1) * signed_sin        x: Reshape(P, [T, H, D])

with cos = [c, c] and signed_sin = [-s, s] ([T, 1, D], built once per step by `rope_tables`).
`fuse_rotary(model)` replaces each such pattern with `com.microsoft.RotaryEmbedding` on P itself
([1, T, H*D], non-interleaved), fed with the step's own tables: cos_cache = c and sin_cache = s
([T, D/2], taken before the exporter doubles them where it is seen doing so, else sliced out of
cos and signed_sin once per step) and position ids 0..T-1, so every
rope variant the exporter computes (scaled, llama3, ...) is kept as it is. Four nodes per q/k
(and their intermediates) become one.

Only that exact pattern is matched (the Gather's indices must be the half swap); anything else is
left as it is. The engine file on disk is unchanged: this runs on load, on the CPU only.
"""

from __future__ import annotations

from apar_rt.backends.onnx_graph import cast_to, constants, producers_and_uses

PREFIX = "apar/rope/"


def _match(add, producer: dict, consts: dict):
    """The rope pattern whose final Add is `add`: (its two Muls and Gather, x's Reshape, cos,
    signed_sin, H, D), or None."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    for a_name, b_name in (add.input, add.input[::-1]):
        a, b = producer.get(a_name), producer.get(b_name)   # a = x * cos, b = Gather(x) * signed_sin
        if a is None or b is None or a.op_type != "Mul" or b.op_type != "Mul":
            continue
        for x in a.input:
            reshape = producer.get(x)
            gather = next((producer[i] for i in b.input if i in producer and producer[i].op_type == "Gather"
                           and producer[i].input[0] == x), None)
            if gather is None or reshape is None or reshape.op_type != "Reshape":
                continue
            shape = consts.get(reshape.input[1])
            axis = next((at.i for at in gather.attribute if at.name == "axis"), 0)
            if shape is None or shape.ndim != 1 or len(shape) != 3 or int(shape[1]) <= 0 or axis not in (2, -1):
                continue
            H, D = int(shape[1]), int(shape[2])
            swap = consts.get(gather.input[1])
            if D % 2 or swap is None or swap.tolist() != list(range(D // 2, D)) + list(range(D // 2)):
                continue
            cos = a.input[1] if a.input[0] == x else a.input[0]
            signed_sin = b.input[1] if b.input[0] == gather.output[0] else b.input[0]
            return (a, b, gather), reshape, cos, signed_sin, H, D
    return None


def _halves(producer: dict, consts: dict, cos: str, signed_sin: str) -> tuple[str | None, str | None, int | None]:
    """(c, s, dtype) when the step's tables are [Cast(dtype)] Unsqueeze(Concat([c, c]), [1]) and
    [Cast(dtype)] Unsqueeze(Concat([Neg(s), s]), [1]) (Concat on the last axis; dtype None
    without the Cast), as the exporter writes them; else (None, None, None): they are then sliced
    out of the tables."""
    def doubled(name):
        node, to = producer.get(name), None
        if node is not None and node.op_type == "Cast":
            to = cast_to(node)
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Unsqueeze" or len(node.input) < 2:
            return None
        axes = consts.get(node.input[1])
        cat = producer.get(node.input[0])
        if axes is None or axes.tolist() != [1] or cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
            return None
        if next((a.i for a in cat.attribute if a.name == "axis"), None) not in (-1, 1):
            return None
        return cat.input, to
    cc, ss = doubled(cos), doubled(signed_sin)
    if cc is None or ss is None or cc[1] != ss[1] or cc[0][0] != cc[0][1]:
        return None, None, None
    neg = producer.get(ss[0][0])
    if neg is None or neg.op_type != "Neg" or neg.input[0] != ss[0][1]:
        return None, None, None
    return cc[0][0], ss[0][1], cc[1]


def fuse_rotary(model) -> int:
    """Replace every rotary pattern of `model`'s main graph (a ModelProto, changed in place) with
    RotaryEmbedding; returns how many (q and k of each layer: 2 per layer)."""
    from onnx import helper

    g = model.graph
    consts = constants(g)
    producer, uses = producers_and_uses(g.node)
    matches = [(add, *m) for add in g.node if (m := _match(add, producer, consts)) is not None]
    tables = {(m[3], m[4], m[6]) for m in matches}
    if not matches or len(tables) != 1:   # one rope per model: the step's tables are shared
        return 0
    cos, signed_sin, D = tables.pop()

    # once per step: c, s [T, D/2] and position ids [1, T]
    def const(name, values):
        import numpy as np
        from onnx import numpy_helper

        return helper.make_node("Constant", [], [PREFIX + name],
                                value=numpy_helper.from_array(np.asarray(values, np.int64), PREFIX + name))

    p = PREFIX
    step = [const("shape", [-1, D]), const("zero", [0]), const("half", [D // 2]), const("end", [D]),
            const("axis1", [1]), const("axis0", [0]), const("zero_s", 0), const("one_s", 1)]
    c, s, to = _halves(producer, consts, cos, signed_sin)
    if c is not None:   # the exporter doubled c and s itself: take them before it did (and its Cast)
        step += [helper.make_node("Identity", [x], [out]) if to is None else helper.make_node("Cast", [x], [out], to=to)
                 for x, out in ((c, p + "cos"), (s, p + "sin"))]
    else:
        step += [helper.make_node("Reshape", [cos, p + "shape"], [p + "cos2"]),
                 helper.make_node("Slice", [p + "cos2", p + "zero", p + "half", p + "axis1"], [p + "cos"]),
                 helper.make_node("Reshape", [signed_sin, p + "shape"], [p + "sin2"]),
                 helper.make_node("Slice", [p + "sin2", p + "half", p + "end", p + "axis1"], [p + "sin"])]
    step += [helper.make_node("Shape", [p + "cos"], [p + "T1"], start=0, end=1),
            helper.make_node("Squeeze", [p + "T1", p + "axis0"], [p + "T"]),
            helper.make_node("Range", [p + "zero_s", p + "T", p + "one_s"], [p + "range"]),
            helper.make_node("Unsqueeze", [p + "range", p + "axis0"], [p + "positions"])]
    replace, dead = {}, set()
    for k, (add, parts, reshape, _, _, H, _) in enumerate(matches):
        x_in, y = f"{p}q{k}/in", f"{p}q{k}/out"
        replace[id(add)] = [
            helper.make_node("Unsqueeze", [reshape.input[0], p + "axis0"], [x_in]),
            helper.make_node("RotaryEmbedding", [x_in, p + "positions", p + "cos", p + "sin"], [y],
                             name=f"{p}q{k}", domain="com.microsoft", interleaved=0, num_heads=H),
            helper.make_node("Reshape", [y, reshape.input[1]], [add.output[0]])]
        dead.update(id(n) for n in parts)
        if uses.get(reshape.output[0], 0) == 2:   # only the two rope nodes read x
            dead.add(id(reshape))
    nodes = []
    for n in g.node:
        if id(n) in dead:
            continue
        if id(n) in replace:
            nodes += step
            step = []
            nodes += replace[id(n)]
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(matches)
