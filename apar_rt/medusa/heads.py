"""Medusa-1 heads: per head, ResBlock(s) x + SiLU(Wx + b), then a projection to the vocabulary.

On disk (the FasterDecoding/Medusa layout, also the `medusa` folder of THUDM/apar-7b):
`config.json` with `medusa_num_heads` and `medusa_num_layers`, and the heads' state dict in
`medusa_lm_head.safetensors` or `medusa_lm_head.pt` (read with weights_only=True), with keys
`{head}.{layer}.linear.weight|bias` for the ResBlocks and `{head}.{num_layers}.weight` for the
projection (a `medusa_head.` prefix, as newer Medusa versions write, is accepted).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from apar_rt.config import ModelLoadError
from apar_rt.medusa.folder import HEADS_DIRNAME, find_heads_dir  # noqa: F401  (re-exported)
WEIGHTS_SAFE = "medusa_lm_head.safetensors"
WEIGHTS_PT = "medusa_lm_head.pt"


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """hidden [N, hidden] -> logits [N, num_heads, vocab]; head h predicts the token h + 2 ahead."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int = 1) -> None:
        super().__init__()
        self.num_heads, self.num_layers, self.vocab = num_heads, num_layers, vocab
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)], nn.Linear(hidden, vocab, bias=False))
            for _ in range(num_heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(hidden) for h in self.heads], dim=1).float()

    @classmethod
    def init_from_lm_head(cls, lm_head: torch.Tensor, num_heads: int, num_layers: int = 1) -> "MedusaHeads":
        """Fresh heads as Medusa initialises them: ResBlocks at identity, projections = lm_head."""
        vocab, hidden = lm_head.shape
        heads = cls(hidden, vocab, num_heads, num_layers)
        with torch.no_grad():
            for h in heads.heads:
                for block in list(h)[:-1]:
                    nn.init.zeros_(block.linear.weight)
                    nn.init.zeros_(block.linear.bias)
                h[-1].weight.copy_(lm_head)
        return heads

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(
            {"medusa_num_heads": self.num_heads, "medusa_num_layers": self.num_layers}, indent=1))
        state = {f"{k.split('.', 1)[1]}": v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_SAFE))


def read_heads_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The heads' tensors in a Medusa folder, by their names without a `medusa_head.` prefix
    (safetensors, else the .pt read with weights_only=True); ModelLoadError if there are none."""
    path = Path(path)
    if (path / WEIGHTS_SAFE).is_file():
        from safetensors.torch import load_file
        state = load_file(str(path / WEIGHTS_SAFE))
    elif (path / WEIGHTS_PT).is_file():
        try:
            state = torch.load(str(path / WEIGHTS_PT), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot read {path / WEIGHTS_PT} with weights_only=True: {e}") from None
    else:
        raise ModelLoadError(f"{str(path)!r} holds no Medusa weights ({WEIGHTS_SAFE} or {WEIGHTS_PT})")
    return {k.removeprefix("medusa_head."): v for k, v in state.items()}   # newer Medusa saves


def load_heads(path: str | Path, *, hidden: int, vocab: int, dtype=torch.float32, device="cpu") -> MedusaHeads:
    """Load heads from a Medusa folder; ModelLoadError says what does not match the model."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a Medusa heads folder: it has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
        num_heads, num_layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file} does not describe Medusa heads (medusa_num_heads): {e}") from None
    state = read_heads_state(path)
    proj = state.get(f"0.{num_layers}.weight")
    if proj is None:
        raise ModelLoadError(f"Medusa weights in {str(path)!r} lack the projection '0.{num_layers}.weight'")
    if tuple(proj.shape) != (vocab, hidden):
        raise ModelLoadError(f"Medusa heads in {str(path)!r} project {proj.shape[1]} -> {proj.shape[0]} "
                             f"(hidden -> vocab), but the model has hidden {hidden} and vocab {vocab}")
    heads = MedusaHeads(hidden, vocab, num_heads, num_layers)
    wanted = {f"heads.{k}": k for k in (n.split(".", 1)[1] for n in heads.state_dict())}
    missing = [k for k in wanted.values() if k not in state]
    if missing:
        raise ModelLoadError(f"Medusa weights in {str(path)!r} lack {missing[:4]}")
    heads.load_state_dict({full: state[short] for full, short in wanted.items()})
    return heads.to(device=device, dtype=dtype).eval()
