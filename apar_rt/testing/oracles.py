"""Independent oracles for engine output, shared by the tests and the GPU check.

- `hf_greedy`: transformers `generate(do_sample=False)` tokens for one prompt;
- `assert_branches_follow_argmax`: the APAR oracle. Every sampled token of every branch equals
  transformers' argmax for that branch's own context (prompt, then each ancestor's text up to and
  including the [Fork] that spawned the next branch, then [Child]) after the same bias and bans.
"""

from __future__ import annotations


def hf_greedy(hf, ids, n, eos):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([ids], device=hf.device), do_sample=False, max_new_tokens=n,
                          eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def banned_for(context, depth, fork, child, max_depth):
    banned = {child}
    if context[-1] in (fork, child) or depth >= max_depth:
        banned.add(fork)
    return banned


def assert_branches_follow_argmax(hf, o, fork, child, bias, max_depth):
    """Every sampled token of every branch is HF's argmax for that branch's context (schema rules),
    after the same logit bias and bans; children start with [Child] at a [Fork] of their parent."""
    import torch

    assert o.error is None
    br = {b["id"]: b for b in o.branches}
    assert br[0]["parent"] is None and br[0]["fork_index"] is None
    depth = {0: 0}
    for b in o.branches[1:]:
        parent = br[b["parent"]]
        assert parent["token_ids"][b["fork_index"]] == fork
        assert b["token_ids"][0] == child
        depth[b["id"]] = depth[b["parent"]] + 1
    assert o.stats["forks"] == len(o.branches) - 1
    for b in o.branches:
        chain, node = [], b
        while node["parent"] is not None:
            chain.append(node)
            node = br[node["parent"]]
        prefix = list(o.prompt_token_ids)
        for anc_child in reversed(chain):
            prefix += br[anc_child["parent"]]["token_ids"][:anc_child["fork_index"] + 1]
        toks = b["token_ids"]
        start = 1 if b["parent"] is not None else 0
        for i in range(start, len(toks)):
            ctx = prefix + toks[:i]
            with torch.no_grad():
                logits = hf(torch.tensor([ctx], device=hf.device)).logits[0, -1].float().clone()
            logits[fork] += bias
            for t in banned_for(ctx, depth[b["id"]], fork, child, max_depth):
                logits[t] = float("-inf")
            assert toks[i] == int(torch.argmax(logits)), (o.prompt, b["id"], i)
        # a [Fork] that is not the branch's last token spawned a child at that index
        for i, t in enumerate(toks):
            if t == fork and i < len(toks) - 1:
                assert any(c["parent"] == b["id"] and c["fork_index"] == i for c in o.branches)
