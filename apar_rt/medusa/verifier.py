"""Verification of a thread's draft tree, and drafting the next tree from the Medusa heads.

Greedy acceptance is lossless: a draft node is accepted only if it equals the argmax of the
processed logits (bias, bans) at its parent, so the accepted run plus the bonus token is
exactly what plain greedy decoding would produce. Typical acceptance (temperature > 0) works on
the request's own sampling distribution (temperature, then top-k and top-p, as `sampler`
defines it): a node is accepted when it is in that distribution's kept set and
q(node | parent) > min(epsilon, alpha * exp(-H(q))). The bonus token is drawn from q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from apar_rt.core import SamplingParams
from apar_rt.medusa.tree import MedusaTree
from apar_rt.sampler import SamplingBatch, SamplingError, draw, error_message, kept_probs, process, valid_rows

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
            generator: the request's RNG (numpy), for the bonus token of a sampled request.
        Returns:
            (tokens, nodes): the accepted draft tokens followed by the bonus token, and for each
            token the tree index whose logits produced it (0 = root).
        Raises:
            SamplingError: a node on the path has no valid distribution.
        """
        tree = self.tree
        node_tokens = [root_token, *draft]
        batch = SamplingBatch()
        for t in node_tokens:
            batch.add(params, banned(t))
        x = process(np.asarray(logits), batch)
        ok = valid_rows(x)
        if params.greedy:
            path = [0]
            while True:
                if not ok[path[-1]]:
                    raise SamplingError(error_message(params))
                target = int(np.argmax(x[path[-1]]))
                nxt = next((c for c in tree.children[path[-1]] if node_tokens[c] == target), None)
                if nxt is None:
                    return [node_tokens[i] for i in path[1:]] + [target], path
                path.append(nxt)
        if not ok.all():
            raise SamplingError(error_message(params))
        n = len(node_tokens)
        q = kept_probs(x, np.full(n, params.temperature), np.full(n, params.top_k, np.int64),
                       np.full(n, params.top_p))
        if not np.isfinite(q).all():
            raise SamplingError(error_message(params))
        path = self._longest_typical(q, node_tokens)
        u = np.array([generator.random()])
        bonus = int(draw(q[path[-1]][None, :], u)[0])
        return [node_tokens[i] for i in path[1:]] + [bonus], path

    def _longest_typical(self, q: np.ndarray, node_tokens: Sequence[int]) -> list[int]:
        eps, alpha = self.acceptance.epsilon, self.acceptance.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            logq = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), 0.0)
        entropy = -(q * logq).sum(axis=1)
        threshold = np.minimum(eps, alpha * np.exp(-entropy))
        best: list[int] = [0]

        def walk(path: list[int]) -> None:
            nonlocal best
            if len(path) > len(best):
                best = list(path)
            node = path[-1]
            for c in self.tree.children[node]:
                p = q[node, node_tokens[c]]
                if p > 0 and p > threshold[node]:       # p > 0: inside the top-k / top-p set
                    walk(path + [c])

        walk([0])
        return best

    def drafts_for(self, params: SamplingParams) -> bool:
        """Whether a request with these params decodes with draft trees."""
        return params.greedy or self.acceptance.kind == "typical"

    def draft(self, medusa_logits) -> list[int]:
        """Draft tokens for the next tree from the heads' logits [H, V] at the new root."""
        m = np.asarray(medusa_logits)
        ranked = []
        for d, k in enumerate(self.tree.topk):
            row = m[d]
            top = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
            ranked.append(top[np.lexsort((top, -row[top]))].tolist())
        return self.tree.draft_tokens(ranked)
