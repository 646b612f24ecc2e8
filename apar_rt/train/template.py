"""The Vicuna v1.1 chat template, defined once for the whole project.

A single-turn prompt is ``f"{VICUNA_V1_1_SYSTEM} USER: {prompt} ASSISTANT:"``; the
assistant's answer follows after one space and ends with ``</s>``::

    A chat between ... questions. USER: Give me 4 tips. ASSISTANT: Here are ...</s>

This is FastChat's ``vicuna_v1.1`` template (sep ``" "``, sep2 ``"</s>"``), the one
THUDM/APAR trains and serves with.
"""

from __future__ import annotations

VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_1_USER = "USER"
VICUNA_V1_1_ASSISTANT = "ASSISTANT"
VICUNA_V1_1_EOS = "</s>"

# Jinja chat template equivalent to `vicuna_prompt` (saved with the demo tokenizer).
VICUNA_V1_1_JINJA = (
    "{{ '" + VICUNA_V1_1_SYSTEM.replace("'", "\\'") + "' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ASSISTANT: ' + m['content'] + '</s>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def vicuna_prompt(prompt: str) -> str:
    """Return the single-turn Vicuna v1.1 prompt; generation starts right after it."""
    return f"{VICUNA_V1_1_SYSTEM} {VICUNA_V1_1_USER}: {prompt} {VICUNA_V1_1_ASSISTANT}:"
