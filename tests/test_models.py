"""Model resolution, caching and loading (tiny model; one slow test converts the real SmolLM2 GGUF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlrt_core.models import cache_root, load_model, load_tokenizer, resolve_model_path, torch_dtype

REPO = Path(__file__).resolve().parents[1]


def test_hub_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tiny_model_directory_and_loading():
    d = resolve_model_path("tiny")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "rlrt-model.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vLLM CPU attention needs it
    model = load_model("tiny")
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = load_tokenizer("tiny")
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>" and tok.chat_template
    # resolving a directory gives the same directory; case of built-in names does not matter
    assert resolve_model_path(str(d)) == d.resolve() and resolve_model_path("TINY") == d


def test_bfloat16_and_bad_dtype():
    assert load_model("tiny", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        torch_dtype("float8")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RLRT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    monkeypatch.delenv("RLRT_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "rlrt"


@pytest.mark.parametrize(
    "path,match",
    [("/nonexistent/model", "unknown model path '/nonexistent/model'"), ("", "non-empty string")],
)
def test_unknown_paths(path, match):
    with pytest.raises(ValueError, match=match):
        resolve_model_path(path)
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.slow
def test_concurrent_builds_into_one_cache_are_deterministic(tmp_path):
    """Two processes building the tiny model into a fresh cache at once: one directory, no temp
    leftovers, and the same weights as the default cache's copy (fixed seed)."""
    code = "from rlrt_core.models import resolve_model_path; print(resolve_model_path('tiny', cache_dir=%r))"
    procs = [subprocess.Popen([sys.executable, "-c", code % str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    models = sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".locks"))
    assert len(models) == 1 and models[0].startswith("tiny-"), models
    built = load_file(str(Path(paths.pop()) / "model.safetensors"))
    default = load_file(str(resolve_model_path("tiny") / "model.safetensors"))
    assert built.keys() == default.keys() and all(torch.equal(built[k], default[k]) for k in built)


@pytest.mark.slow
def test_smollm2_conversion_answers_like_the_real_model():
    """The GGUF de-quantised to a plain LlamaForCausalLM: right shape, tied, and it does arithmetic."""
    d = resolve_model_path("smollm2-135m-instruct")
    meta = json.loads((d / "rlrt-model.json").read_text())
    assert d.name.endswith(meta["sha256"][:16])
    model = load_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3? Reply with only the number."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "5" in answer, answer
