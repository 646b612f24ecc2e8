"""Where a model keeps its Medusa heads (no torch: the runtime asks before loading anything)."""

from __future__ import annotations

from pathlib import Path

HEADS_DIRNAME = "medusa"


def find_heads_dir(model_dir: str | Path) -> Path | None:
    """`<model>/medusa` if it holds heads, else None."""
    d = Path(model_dir) / HEADS_DIRNAME
    return d if (d / "config.json").is_file() else None
