"""Generation engines behind one interface: `TorchEngine` (transformers) and `VLLMEngine` (vLLM).

`make_engine(cfg)` builds the one named by `cfg.rollout.engine`. vLLM is imported only when a
VLLMEngine is built (it lives in its own environment, see `make vllm-env`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlrt_core.engines.base import (
    Completion,
    Engine,
    EngineStream,
    FinishedGroup,
    GenerationResult,
    ParamSpec,
    SamplingParams,
    WeightLoadError,
    collect_weights,
    derive_seed,
    sample_next,
)
from rlrt_core.engines.torch_engine import TorchEngine, TorchStream

if TYPE_CHECKING:
    from rlrt_core.config import RunConfig
    from rlrt_core.engines.vllm_engine import VLLMEngine

__all__ = [
    "Completion", "Engine", "EngineStream", "FinishedGroup", "GenerationResult", "ParamSpec", "SamplingParams", "TorchEngine", "TorchStream", "VLLMEngine",
    "WeightLoadError", "collect_weights", "derive_seed", "make_engine", "make_teacher_engine", "sample_next",
]


def __getattr__(name: str) -> Any:
    # VLLMEngine is importable from here without importing vllm until it is used.
    if name == "VLLMEngine":
        from rlrt_core.engines.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_engine(cfg: "RunConfig") -> Engine:
    """The rollout engine that `cfg.rollout.engine` names ("torch" or "vllm"), on cfg.model."""
    kind = cfg.rollout.engine
    if kind == "torch":
        return TorchEngine(cfg.model.path, dtype=cfg.model.dtype, device=cfg.rollout.device,
                           cache_dir=cfg.model.cache_dir, max_model_len=cfg.model.max_model_len)
    if kind == "vllm":
        from rlrt_core.engines.vllm_engine import VLLMEngine

        v = cfg.rollout.vllm
        return VLLMEngine(cfg.model.path, dtype=cfg.model.dtype if v.dtype == "auto" else v.dtype,
                          tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                          enforce_eager=v.enforce_eager, max_model_len=cfg.model.max_model_len,
                          cache_dir=cfg.model.cache_dir, seed=cfg.rollout.seed or 0)
    raise ValueError(f"unknown rollout engine {kind!r}; choose 'torch' or 'vllm'")


def make_teacher_engine(cfg: "RunConfig") -> Engine:
    """The teacher scorer's engine, as `cfg.teacher.engine` names it, on cfg.model.

    torch: a `TorchEngine` on `teacher.device` whose `.model` is scored by `rlrt_core.scoring`.
    vllm: a `VLLMEngine` with prefix caching (the K rollouts of a group share their prompt's
    prefill) and `max_logprobs` >= teacher.topk; its context is the model's own (teacher prompts
    add the privileged context to the rollout's prompt + completion), sized by `teacher.vllm`.
    Both load new weight versions through `load_weights`."""
    kind = cfg.teacher.engine
    if kind == "torch":
        return TorchEngine(cfg.model.path, dtype=cfg.model.dtype, device=cfg.teacher.device,
                           cache_dir=cfg.model.cache_dir)
    if kind == "vllm":
        from rlrt_core.engines.vllm_engine import VLLMEngine

        v = cfg.teacher.vllm
        return VLLMEngine(cfg.model.path, dtype=cfg.model.dtype if v.dtype == "auto" else v.dtype,
                          tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                          enforce_eager=v.enforce_eager, cache_dir=cfg.model.cache_dir,
                          enable_prefix_caching=True, max_logprobs=max(20, cfg.teacher.topk))
    raise ValueError(f"unknown teacher engine {kind!r}; choose 'torch' or 'vllm'")
