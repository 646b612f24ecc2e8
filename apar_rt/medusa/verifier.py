"""Verification of a thread's draft tree, and drafting the next tree from the Medusa heads.

Greedy acceptance is lossless: a draft node is accepted only if it equals the argmax of the
processed logits (bias, bans) at its parent, so the accepted run plus the bonus token is
exactly what plain greedy decoding would produce. Typical acceptance (temperature > 0) works on
the request's own sampling distribution (temperature, then top-k and top-p, as `sampler`
defines it): a node is accepted when it is in that distribution's kept set and
q(node | parent) > min(epsilon, alpha * exp(-H(q))). The bonus token is drawn from q.

Verification is split so that a whole step's trees are sampled in one pass on the backend's
device: `add_tree` puts a tree's nodes (with their bans, and for typical acceptance one uniform
and a probe per draft node) into the step's `SamplingBatch`; `accept` walks the tree from the
small `Sampled` arrays that come back (per node: the greedy or drawn token, ok, the entropy;
per draft node: its kept probability under its parent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from apar_rt.core import SamplingParams
from apar_rt.medusa.tree import MedusaTree
from apar_rt.sampler import Sampled, SamplingBatch, SamplingError, error_message, sample

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


@dataclass(frozen=True, slots=True)
class TreeRows:
    """Where one tree's nodes sit in a step's SamplingBatch."""

    first: int                    # batch row of the root; node i is row first + i
    node_tokens: tuple[int, ...]  # the root token, then the draft tokens
    first_probe: int              # typical: probe of draft node c is first_probe + c - 1; -1 when greedy
    params: SamplingParams


class MedusaVerifier:
    def __init__(self, tree: MedusaTree, acceptance: Acceptance = Acceptance()) -> None:
        self.tree = tree
        self.acceptance = acceptance

    def add_tree(self, batch: SamplingBatch, root_token: int, draft: Sequence[int], params: SamplingParams,
                 banned: Callable[[int], Sequence[int]], generator) -> TreeRows:
        """Add one tree's nodes to `batch` (all or none of them).

        Args:
            root_token, draft: the tokens fed at the root and at each draft node.
            banned: token ids banned after a given last token.
            generator: the branch's RNG (numpy; `Branch.generator`); a sampled request draws one
                uniform, for its bonus token.
        """
        node_tokens = (int(root_token), *map(int, draft))
        if len(node_tokens) != self.tree.size:
            raise ValueError(f"a draft of {len(draft)} tokens for a tree of {self.tree.num_nodes} nodes")
        bans = [banned(t) for t in node_tokens]
        if params.greedy:
            return TreeRows(batch.add_rows(params, bans), node_tokens, -1, params)
        u = float(generator.random())
        first_probe = len(batch.probes)
        first = batch.add_rows(params, bans, u)
        parents = self.tree.parents
        batch.probes.extend([(first + parents[c], node_tokens[c]) for c in range(1, len(node_tokens))])
        return TreeRows(first, node_tokens, first_probe, params)

    def accept(self, sampled: Sampled, rows: TreeRows) -> tuple[list[int], list[int]]:
        """Accept the longest run of the tree from the sampled nodes.

        Returns:
            (tokens, nodes): the accepted draft tokens followed by the bonus token, and for each
            token the tree index whose logits produced it (0 = root).
        Raises:
            SamplingError: a node on the path (typical: any node) has no valid distribution.
        """
        f, node_tokens = rows.first, rows.node_tokens
        tokens, ok = sampled.tokens, sampled.ok
        if rows.first_probe < 0:
            path = [0]
            while True:
                if not ok[f + path[-1]]:
                    raise SamplingError(error_message(rows.params))
                target = int(tokens[f + path[-1]])
                nxt = next((c for c in self.tree.children[path[-1]] if node_tokens[c] == target), None)
                if nxt is None:
                    return [node_tokens[i] for i in path[1:]] + [target], path
                path.append(nxt)
        n = len(node_tokens)
        if not ok[f:f + n].all():
            raise SamplingError(error_message(rows.params))
        probs = sampled.probes[rows.first_probe:rows.first_probe + n - 1]
        path = self._longest_typical(probs, sampled.entropy[f:f + n])
        return [node_tokens[i] for i in path[1:]] + [int(tokens[f + path[-1]])], path

    def verify(self, logits, root_token: int, draft: Sequence[int], params: SamplingParams,
               banned: Callable[[int], Sequence[int]], generator) -> tuple[list[int], list[int]]:
        """One tree on the host: `add_tree`, the numpy sampler over logits [tree.size, V] (root
        first, in node order), then `accept`."""
        batch = SamplingBatch()
        rows = self.add_tree(batch, root_token, draft, params, banned, generator)
        return self.accept(sample(np.asarray(logits, np.float32), batch), rows)

    def _longest_typical(self, probs: np.ndarray, entropy: np.ndarray) -> list[int]:
        """probs[c - 1]: draft node c's kept probability under its parent; entropy per node."""
        eps, alpha = self.acceptance.epsilon, self.acceptance.alpha
        threshold = np.minimum(eps, alpha * np.exp(-entropy))
        best: list[int] = [0]

        def walk(path: list[int]) -> None:
            nonlocal best
            if len(path) > len(best):
                best = list(path)
            node = path[-1]
            for c in self.tree.children[node]:
                p = probs[c - 1]
                if p > 0 and p > threshold[node]:       # p > 0: inside the top-k / top-p set
                    walk(path + [c])

        walk([0])
        return best

    def drafts_for(self, params: SamplingParams) -> bool:
        """Whether a request with these params decodes with draft trees."""
        return params.greedy or self.acceptance.kind == "typical"

    @property
    def max_rank(self) -> int:
        """How many ranked candidates per head drafting needs (the widest level of the tree)."""
        return max(self.tree.topk)

    def draft(self, ranked) -> list[int]:
        """Draft tokens for the next tree from the heads' ranked candidates at the new root:
        ranked [H, >= max_rank] token ids (an array, or nested lists of ints), best first, ties to
        the lower id (`ranked_top_k`)."""
        return self.tree.draft_tokens(ranked.tolist() if isinstance(ranked, np.ndarray) else ranked)
