"""The interface every backend implements: run one packed step over its own KV pool."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from apar_rt.core import StepInput
from apar_rt.sampler import Sampled, SamplingBatch, ranked_top_k, sample


class BackendUnavailable(RuntimeError):
    """The backend's library is missing or unusable here; the message says which."""


def load_engine_folder(engine_dir, backend: str, *, check_hashes: bool, medusa_dir: str | None):
    """The verified manifest of a built engine folder, and its number of Medusa heads.

    Raises BackendUnavailable when Medusa is asked for but the engine was built without heads.
    """
    from apar_rt.build.manifest import verify_engine_dir

    m = verify_engine_dir(engine_dir, backend=backend, check_hashes=check_hashes)
    if medusa_dir is not None and not m.medusa:
        raise BackendUnavailable(f"{str(engine_dir)!r} was built without Medusa heads; rebuild it from a "
                                 f"model folder that has a 'medusa' heads folder")
    return m, int(m.medusa.get("num_heads", 0))


class Backend(ABC):
    """Owns the model weights (or engine) and the per-layer K/V pools.

    `forward` must, in this order: run `step.block_copies` on the pool (copy-on-write),
    compute the step (attention reads the pool as it was before this step), write each new
    token's K/V to `step.slot_mapping` (slots < 0 are skipped), and return the logits of
    `step.logits_indices` as float32 [N, vocab] on the CPU: a torch tensor, or a numpy array from
    a backend that runs without torch (onnxruntime on the CPU). The sampler takes either.
    """

    name: str = "?"
    # The longest prompt chunk of one sequence this backend runs best in one step (0: any that
    # fits the step); the engine's default for EngineConfig.long_prefill_token_threshold.
    preferred_prefill_chunk: int = 0

    @abstractmethod
    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """(Re)create zeroed K/V pools of shape [num_blocks, block_size, Hkv, D] per layer."""

    @abstractmethod
    def forward(self, step: StepInput):
        """Run one step; returns logits [N, vocab] float32 on the CPU (torch or numpy)."""

    # ---- the engine's step: outputs stay with the backend ------------------------------------

    def execute(self, step: StepInput) -> None:
        """Run one step for the engine, keeping its outputs (logits, Medusa logits) with the
        backend until the next step; `sample` and `medusa_topk` read them. The default keeps
        `forward`'s host logits; a backend whose logits live on a device keeps them there."""
        self._step_logits = self.forward(step)

    def step_logits(self):
        """The last `execute`'s logits [N, vocab] float32 on the CPU (torch or numpy)."""
        return self._step_logits

    def sample(self, rows, batch: SamplingBatch) -> Sampled:
        """Sample batch row i from row rows[i] of the last `execute`'s logits, as
        `apar_rt.sampler.sample` defines it. The default runs that numpy reference on the host
        logits; a device backend runs the same steps where its logits are and returns only the
        small arrays."""
        logits = np.asarray(self.step_logits())
        rows = np.asarray(rows, np.int64)
        n = len(rows)
        if n == logits.shape[0] and (n == 0 or (rows[0] == 0 and rows[-1] == n - 1)):   # rows increase: all, in order
            return sample(logits, batch)
        return sample(logits[rows], batch, inplace=True)

    def medusa_topk(self, rows, k: int, heads: int | None = None) -> np.ndarray:
        """[R, heads, k] int64: for each logits row in `rows` of the last step, each of the first
        `heads` Medusa heads' (None: all) k best token ids (`apar_rt.sampler.ranked_top_k`:
        largest first, ties to the lower id)."""
        m = np.asarray(self.medusa_logits_at(rows))[:, :heads]
        R, H, V = m.shape
        return ranked_top_k(m.reshape(R * H, V), k).reshape(R, H, -1)

    def prepare_drafting(self, heads: int) -> None:
        """Drafting will read the first `heads` Medusa heads only (its tree's depth): a backend
        may stop computing the others. The default computes them all."""

    def medusa_logits_at(self, rows):
        """The heads' logits [R, heads, vocab] at the last step's logits rows `rows` (a backend
        that runs the heads apart from the step computes these rows only)."""
        return np.asarray(self.medusa_logits())[np.asarray(rows, np.int64)]

    # ---- Medusa (optional) -----------------------------------------------------------------

    num_medusa_heads: int = 0

    def medusa_logits(self):
        """The Medusa heads' logits [N, heads, vocab] (float32, CPU; torch or numpy) at the rows of the last
        forward's logits. Only for backends loaded with heads."""
        raise NotImplementedError(f"backend {self.name!r} has no Medusa heads loaded")

    def commit_kv(self, token_indices, slots) -> None:
        """Write the K/V of the last forward's tokens `token_indices` (into the packed step) to
        `slots`. Used for draft trees: the accepted nodes off the tree's first path (the step wrote
        the first path's K/V itself, `MedusaTree.first_path`)."""
        raise NotImplementedError(f"backend {self.name!r} cannot write K/V after a step")

    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block takes over all layers (K and V)."""
        raise NotImplementedError
