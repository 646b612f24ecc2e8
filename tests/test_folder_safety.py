"""A model folder runs no code and reads nothing outside itself."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from apar_rt import LLM
from apar_rt.config import ModelLoadError

PAYLOAD = '''
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture
def folder(tiny_gqa, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_gqa[0], dst)
    return dst


def test_remote_code_is_refused_never_prompted_even_with_yes_on_stdin(folder, tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    (folder / "evil_tokenizer.py").write_text(PAYLOAD.format(marker=str(marker)))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "EvilTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\ny\n"))   # a prompt would read "y" and run it
    with pytest.raises(ModelLoadError, match="never runs code from a model folder"):
        LLM(str(folder), dtype="float32", device="cpu")
    assert not marker.exists()
    assert sys.stdin.read() == "y\ny\ny\n"       # nothing asked


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(folder, shard):
    shutil.copy(folder / "model.safetensors", folder.parent / "outside.safetensors")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(ModelLoadError, match="not inside the model folder"):
        LLM(str(folder), dtype="float32", device="cpu")
