"""Fast start: an onnxruntime engine folder runs with torch and transformers made unimportable,
and gives the torch backend's greedy tokens; the `tokenizers`-only tokenizer matches transformers'
(ids, text, special ids, chat template) and renders templates in the sandbox."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from apar_rt import LLM, SamplingParams
from apar_rt.build.builder import BuildOptions, build
from apar_rt.model.tokenizer import FastTokenizer, load_tokenizer

DEMO = "samples/models/apar-tiny"
PROMPTS = ["the list of water and sleep", "one two three"]

# Runs the CLI in a fresh interpreter in which importing torch or transformers fails.
_NO_TORCH = """
import json, sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Block())
from apar_rt.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    heavy = [m for m in ("torch", "transformers") if m in sys.modules]
    print(json.dumps({"heavy": heavy}), file=sys.stderr)
    raise
"""


@pytest.fixture(scope="module")
def engine(tiny_gqa, tmp_path_factory):
    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("fast") / "eng"
    build(BuildOptions(model=str(path), output=str(out), block_size=4, max_batch_size=8), progress=False,
          log=lambda m: None)
    return path, out


def _run_without_torch(args: list[str]) -> tuple[list[dict], list[str]]:
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    heavy = json.loads(r.stderr.strip().splitlines()[-1])["heavy"]
    return [json.loads(line) for line in r.stdout.splitlines()], heavy


def test_engine_folder_generates_without_torch_or_transformers(engine, tiny_gqa):
    model, eng = engine
    _, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    args = ["generate", "--engine", str(eng), "--json", "--max-tokens", "24", "--logit-bias", f"{fork}=3.0",
            *PROMPTS]
    got, heavy = _run_without_torch(args)
    assert heavy == []
    oracle = LLM(str(model), backend="torch", dtype="float32", device="cpu", block_size=4)
    want = oracle.generate(PROMPTS, SamplingParams(max_tokens=24, logit_bias={fork: 3.0}))
    assert [g["branches"] for g in got] == [w.to_json()["branches"] for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]
    assert any(w.stats["forks"] for w in want), "the bias was meant to make the oracle fork"


def test_fast_tokenizer_matches_transformers(tiny_gqa):
    from transformers import AutoTokenizer

    path, _, _ = tiny_gqa
    for folder in (str(path), DEMO):
        ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert isinstance(ours, FastTokenizer)
        assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
        assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == \
            (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id)
        assert ours.get_vocab() == theirs.get_vocab()
        for text in ["Give me 3 tips.\n1. Drink water [SplitMask] rest</s> ü", "  two  spaces", ""]:
            for special in (True, False):
                ids = ours(text, add_special_tokens=special).input_ids
                assert ids == theirs(text, add_special_tokens=special).input_ids
                for skip in (True, False):
                    assert ours.decode(ids, skip_special_tokens=skip) == \
                        theirs.decode(ids, skip_special_tokens=skip)


# A Llama-2-style template: a system turn, alternation check via raise_exception, tojson of content.
_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ bos_token }}{% if system %}<<SYS>>{{ system }}<</SYS>>\n{% endif %}"
    "{% for m in rest %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
    "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} {{ 'ok' | tojson }}{% endif %}"
)


def _with_template(src, dst, template: str):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_chat_template_renders_as_transformers(tiny_gqa, tmp_path):
    from transformers import AutoTokenizer

    path, _, _ = tiny_gqa
    folder = _with_template(path, tmp_path / "tpl", _TEMPLATE)
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    chats = [[{"role": "user", "content": "hi é"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    for chat in chats:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_chat_template_runs_in_the_sandbox(tiny_gqa, tmp_path):
    import jinja2.exceptions

    path, _, _ = tiny_gqa
    folder = _with_template(path, tmp_path / "evil", "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
