"""Prompt files for the tools (benchmarks, Medusa distillation): one format, one reader."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_PROMPTS = ("Give me three tips for better sleep.", "List four ways to drink more water.",
                   "How do I plan a week of meals?", "Name five things to pack for a trip.",
                   "Explain how to start running.", "What should I read to learn to code?",
                   "Give me steps to build a small model.", "How can I write better tests?")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: lines that are JSON objects give their "prompt" field, other lines are
    prompts as they are; blank lines are skipped. ValueError names the file and line at fault."""
    path = Path(path)
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n} is not a JSON object with a 'prompt'") from None
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
