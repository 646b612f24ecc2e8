"""Medusa draft trees as data, and the buffers derived from them once per tree.

Pure Python. A tree is a list of "choices": paths of top-k ranks, one rank per depth. The
path (0, 2) means: rank 0 of head 0 at depth 1, then rank 2 of head 1 at depth 2. The tree
is prefix-closed; the root (the thread's last sampled token) is implicit.

Node order (the order of the draft tokens in a packed step, after the root) is by depth, then
by path, so a parent always precedes its children.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PRESET_DIR = Path(__file__).with_name("trees")
DEFAULT_TREE = "tiny_9"   # the Medusa tree when heads are loaded and no tree is named


class TreeError(ValueError):
    """A tree that is not a valid Medusa tree; the message says why."""


@dataclass(frozen=True)
class MedusaTree:
    """Buffers of one tree. Index 0 is the root; draft node i (0-based) is index i + 1."""

    name: str
    paths: tuple[tuple[int, ...], ...]    # per draft node, in node order
    parents: tuple[int, ...]              # per index (root first): parent index, -1 for the root
    depths: tuple[int, ...]               # per index: 0 for the root
    topk: tuple[int, ...]                 # per depth d >= 1: how many ranks head d-1 must supply
    mask: tuple[tuple[bool, ...], ...]    # [n+1][n+1]: index i sees j iff j is i or an ancestor
    retrieve: tuple[tuple[int, ...], ...]  # one row per leaf: indices root..leaf
    children: tuple[tuple[int, ...], ...]  # per index: child indices
    # the root, then each node's first child down to a leaf: node i of it sits at depth i, and a
    # step writes these nodes' K/V where an accepted path through them keeps it (`Scheduler._pack`)
    first_path: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        """Draft tokens (the root excluded)."""
        return len(self.paths)

    @property
    def size(self) -> int:
        """Tokens the tree adds to a step, the root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max(self.depths)

    @classmethod
    def from_choices(cls, choices, name: str = "custom") -> "MedusaTree":
        if not isinstance(choices, (list, tuple)) or not choices:
            raise TreeError(f"tree {name!r}: choices must be a non-empty list of paths like [[0], [0, 0], [1]]")
        paths = []
        for c in choices:
            if not isinstance(c, (list, tuple)) or not c or not all(isinstance(r, int) and r >= 0 for r in c):
                raise TreeError(f"tree {name!r}: {c!r} is not a path of non-negative integer ranks")
            paths.append(tuple(c))
        if len(set(paths)) != len(paths):
            raise TreeError(f"tree {name!r}: a path appears twice")
        pset = set(paths)
        for p in paths:
            if len(p) > 1 and p[:-1] not in pset:
                raise TreeError(f"tree {name!r}: path {list(p)} has no parent {list(p[:-1])} in the tree")
        paths.sort(key=lambda p: (len(p), p))
        index = {p: i + 1 for i, p in enumerate(paths)}
        parents = [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in paths]
        depths = [0] + [len(p) for p in paths]
        n = len(paths) + 1
        max_depth = max(depths)
        topk = tuple(max(p[-1] for p in paths if len(p) == d) + 1 for d in range(1, max_depth + 1))
        mask = [tuple(row) for row in ancestor_mask(parents)]
        children = [[] for _ in range(n)]
        for i in range(1, n):
            children[parents[i]].append(i)
        retrieve = []
        for i in range(n):
            if not children[i]:
                chain, j = [], i
                while j != -1:
                    chain.append(j)
                    j = parents[j]
                retrieve.append(tuple(reversed(chain)))
        first_path = [0]
        while children[first_path[-1]]:
            first_path.append(children[first_path[-1]][0])
        return cls(name=name, paths=tuple(paths), parents=tuple(parents), depths=tuple(depths), topk=topk,
                   mask=tuple(mask), retrieve=tuple(retrieve), children=tuple(tuple(c) for c in children),
                   first_path=tuple(first_path))

    def check_heads(self, num_heads: int) -> None:
        """Raise TreeError if the tree needs more heads than there are."""
        if self.depth > num_heads:
            raise TreeError(f"tree {self.name!r} is {self.depth} deep but the model has {num_heads} Medusa "
                            f"heads; a tree may be at most as deep as the number of heads")

    def draft_tokens(self, topk_per_head: list[list[int]]) -> list[int]:
        """Draft token per node, from each head's ranked candidates (topk_per_head[d][rank])."""
        return [topk_per_head[len(p) - 1][p[-1]] for p in self.paths]


def ancestor_mask(parents) -> list[list[bool]]:
    """Ancestor-or-self visibility [n][n] of a tree given by a parent array (parents[0] == -1 is
    the root): row i is True at i and at every ancestor of i."""
    n = len(parents)
    mask = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j != -1:
            mask[i][j] = True
            j = parents[j]
    return mask


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_tree(spec: str) -> MedusaTree:
    """A preset by name (see preset_names()) or a JSON file: a list of paths, or {"choices": [...]}."""
    path = PRESET_DIR / f"{spec}.json"
    if not path.is_file():
        path = Path(spec)
        if not path.is_file():
            raise TreeError(f"{spec!r} is neither a tree preset ({', '.join(preset_names())}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TreeError(f"tree file {str(path)!r} is not valid JSON: {e}") from None
    choices = data.get("choices") if isinstance(data, dict) else data
    return MedusaTree.from_choices(choices, name=data.get("name", path.stem) if isinstance(data, dict) else path.stem)
