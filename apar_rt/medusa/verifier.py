"""Verification of a thread's draft tree, and drafting the next tree from the Medusa heads.

Greedy acceptance is lossless: a draft node is accepted only if it equals the argmax of the
processed logits (bias, bans) at its parent, so the accepted run plus the bonus token is
exactly what plain greedy decoding would produce. Typical acceptance (temperature > 0)
accepts a node when p(node | parent) > min(epsilon, alpha * exp(-H(parent))).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from apar_rt.core import SamplingParams
from apar_rt.medusa.tree import MedusaTree
from apar_rt.sampler import process_logits, sample_row

ACCEPTANCE = ("greedy", "typical")


@dataclass(frozen=True, slots=True)
class Acceptance:
    """How sampled (temperature > 0) requests use drafts. Greedy requests are always verified
    greedily, which is lossless. "typical" accepts by the typical-acceptance rule; "greedy"
    gives sampled requests no drafts, so their output distribution is exactly unchanged."""

    kind: str = "typical"
    epsilon: float = 0.09      # typical acceptance: hard threshold
    alpha: float = 0.3         # typical acceptance: entropy-scaled threshold, usually sqrt(epsilon)

    def __post_init__(self) -> None:
        if self.kind not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, got {self.kind!r}")


class MedusaVerifier:
    def __init__(self, tree: MedusaTree, acceptance: Acceptance = Acceptance()) -> None:
        self.tree = tree
        self.acceptance = acceptance

    def verify(self, logits, root_token: int, draft: Sequence[int], params: SamplingParams,
               banned: Callable[[int], Sequence[int]], generator) -> tuple[list[int], list[int]]:
        """Accept the longest run of the tree.

        Args:
            logits: [tree.size, V] raw logits, root first, in tree node order.
            root_token, draft: the tokens fed at the root and at each draft node.
            banned: token ids banned after a given last token.
        Returns:
            (tokens, nodes): the accepted draft tokens followed by the bonus token, and for each
            token the tree index whose logits produced it (0 = root).
        """
        tree = self.tree
        node_tokens = [root_token, *draft]
        processed: dict = {}

        def at(i: int):
            if i not in processed:
                processed[i] = process_logits(logits[i], params, banned(node_tokens[i]))
            return processed[i]

        if params.greedy:
            path = [0]
            while True:
                target = int(at(path[-1]).argmax())
                nxt = next((c for c in tree.children[path[-1]] if node_tokens[c] == target), None)
                if nxt is None:
                    return [node_tokens[i] for i in path[1:]] + [target], path
                path.append(nxt)
        path = self._longest_typical(at, node_tokens, params)
        bonus = sample_row(at(path[-1]), params, generator)
        return [node_tokens[i] for i in path[1:]] + [bonus], path

    def _longest_typical(self, at, node_tokens, params: SamplingParams) -> list[int]:
        import torch   # sampled requests only; greedy verification needs no torch

        eps, alpha = self.acceptance.epsilon, self.acceptance.alpha
        best: list[int] = [0]

        def walk(path: list[int]) -> None:
            nonlocal best
            if len(path) > len(best):
                best = list(path)
            row = at(path[-1])
            row = torch.from_numpy(row) if isinstance(row, np.ndarray) else row
            probs = torch.softmax(row / max(params.temperature, 1e-5), dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum()
            threshold = min(eps, alpha * float(torch.exp(-entropy)))
            for c in self.tree.children[path[-1]]:
                if float(probs[node_tokens[c]]) > threshold:
                    walk(path + [c])

        walk([0])
        return best

    def drafts_for(self, params: SamplingParams) -> bool:
        """Whether a request with these params decodes with draft trees."""
        return params.greedy or self.acceptance.kind == "typical"

    def draft(self, medusa_logits) -> list[int]:
        """Draft tokens for the next tree from the heads' logits [H, V] at the new root (torch or
        numpy; numpy ranks by a stable descending sort, torch by topk)."""
        if isinstance(medusa_logits, np.ndarray):
            ranked = [np.argsort(-medusa_logits[d], kind="stable")[:k].tolist()
                      for d, k in enumerate(self.tree.topk)]
        else:
            import torch

            ranked = [torch.topk(medusa_logits[d], k).indices.tolist() for d, k in enumerate(self.tree.topk)]
        return self.tree.draft_tokens(ranked)
