"""The generation-engine interface shared by the torch and vLLM engines.

An engine samples n completions per prompt and reports, for every sampled token, its behaviour
log-prob: the log-probability under the distribution it was actually drawn from, i.e. after
temperature and after top-p truncation + renormalisation (vLLM's `processed_logprobs`). With
top_p = 1 this equals the scorer's `score_tokens(..., temperature=T)` of the same tokens.
Temperature 0 means greedy decoding; its log-probs are then those of the raw (temperature 1) logits.

Completions end at the first EOS token (included in `token_ids`, finish_reason "stop") or after
`max_new_tokens` / at the context limit (finish_reason "length"); nothing after EOS is returned.

Every token also records the weight version whose forward pass produced the logits it was
sampled from (`token_versions`). `generate()` runs one version per call; an `EngineStream`
(continuous batching, `Engine.start_stream()`) may load newer weights between decode steps,
so one completion can span versions: its earlier tokens' KV cache stays as the old weights
computed it (PipelineRL's in-flight update), and its behaviour log-probs are exactly those of
the mixed computation that sampled each token.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

FinishReason = str  # "stop" | "length"


@dataclass
class SamplingParams:
    """How to sample. n: completions per prompt; temperature 0 = greedy; top_p in (0, 1];
    seed: fixes the random stream of a generate() call (None = fresh randomness)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")


def derive_seed(base: int | None, *keys: str) -> int | None:
    """A sampling seed for one batch: None when `base` is None (fresh entropy), else a 63-bit
    hash of (base, keys). Keyed by the batch's group ids, seeds differ across batches,
    workers and restarts (group ids are unique) yet stay reproducible for a fixed base."""
    if base is None:
        return None
    import hashlib

    digest = hashlib.sha256("\x1f".join([str(base), *keys]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Completion:
    """One sampled completion: ids (EOS included when finish_reason == "stop"), one behaviour
    log-prob per id, and the decoded text (special tokens skipped)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str
    token_versions: list[int] = field(default_factory=list)  # weight version per token (or empty)


@dataclass
class GenerationResult:
    """The n completions of one prompt and the weight version that produced them (with
    in-flight updates: the oldest version of any of their tokens)."""

    prompt_ids: list[int]
    completions: list[Completion]
    version: int


@dataclass
class FinishedGroup:
    """A group an `EngineStream` finished: the caller's `key`, the result, and when it was
    added and finished (time.monotonic())."""

    key: Any
    result: GenerationResult
    added_at: float
    finished_at: float


class EngineStream(abc.ABC):
    """Continuous batching at group granularity: `add()` queues a prompt for n completions,
    each `step()` admits queued prompts into free batch rows and decodes every live row by one
    token, returning the groups whose n completions all ended. Callers admit by rows (`rows`),
    not groups: a row whose completion ended is free for new work while its group waits. Weights may be swapped
    (`Engine.load_weights`) between steps; in-flight rows keep going under the new version."""

    @abc.abstractmethod
    def add(self, key: Any, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Queue `sampling.n` completions of `prompt_ids`; `sampling.seed` fixes this group's
        random stream (None = fresh entropy). Raises ValueError for requests the engine cannot serve."""

    @abc.abstractmethod
    def step(self) -> list[FinishedGroup]:
        """One decode step over every live row (admitting queued groups first)."""

    @abc.abstractmethod
    def abort(self) -> list[Any]:
        """Drop every queued and live group; returns their keys."""

    @property
    @abc.abstractmethod
    def groups(self) -> int:
        """Groups queued or live."""

    @property
    @abc.abstractmethod
    def rows(self) -> int:
        """Completion rows the stream holds (live or queued): what a caller budgets admission by."""


class WeightLoadError(ValueError):
    """A weight update that cannot be applied; the engine keeps serving the previous version."""


@dataclass(frozen=True)
class ParamSpec:
    """Expected names and shapes of a model's weights (Hugging Face names)."""

    shapes: Mapping[str, tuple[int, ...]]
    optional: frozenset[str] = field(default_factory=frozenset)  # e.g. a tied lm_head.weight
    tied: Mapping[str, str] = field(default_factory=dict)  # optional name -> the tensor it is tied to


def collect_weights(weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], spec: ParamSpec) -> dict[str, Tensor]:
    """Materialise a state dict or (name, tensor) iterator and check it against `spec`.

    Every required name must be present with its exact shape; unknown names and non-tensors are
    refused. Raises WeightLoadError naming the offending tensors; nothing is applied on error.
    Optional names (a tied lm_head) are dropped: the tie makes them redundant; if given, they must
    equal the tensor they are tied to.
    """
    items = weights.items() if isinstance(weights, Mapping) else weights
    got: dict[str, Tensor] = {}
    problems: list[str] = []
    for entry in items:
        try:
            name, tensor = entry
        except (TypeError, ValueError):
            raise WeightLoadError(f"weights must be a mapping or (name, tensor) pairs, got {entry!r:.80}") from None
        if not isinstance(tensor, Tensor):
            problems.append(f"{name}: not a tensor ({type(tensor).__name__})")
            continue
        if name in got:
            problems.append(f"{name}: given twice")
        got[name] = tensor
    missing = sorted(set(spec.shapes) - set(got) - spec.optional)
    unknown = sorted(set(got) - set(spec.shapes))
    misshaped = [
        f"{n}: shape {tuple(got[n].shape)}, expected {tuple(spec.shapes[n])}"
        for n in sorted(set(got) & set(spec.shapes))
        if tuple(got[n].shape) != tuple(spec.shapes[n])
    ]
    not_float = [f"{n}: dtype {got[n].dtype} is not floating point" for n in sorted(got)
                 if n in spec.shapes and not got[n].is_floating_point()]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        problems.append(f"missing {len(missing)} tensor(s): {shown}")
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        problems.append(f"unknown tensor name(s): {shown}")
    problems.extend(misshaped)
    problems.extend(not_float)
    for name, partner in spec.tied.items():
        if not problems and name in got and partner in got and not torch.equal(got[name], got[partner]):
            problems.append(f"{name} differs from {partner}, but the model ties them (send equal tensors or omit {name})")
    if problems:
        raise WeightLoadError("weight update refused, previous weights kept: " + "; ".join(problems))
    return {n: t for n, t in got.items() if n not in spec.optional}


class Engine(abc.ABC):
    """Generates completions with behaviour log-probs; swaps weights between generate() calls."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int

    def __init__(self, version: int = 0) -> None:
        self._version = int(version)
        # generate() and load_weights() never interleave: a batch is produced by one version.
        self._lock = threading.RLock()

    @property
    def version(self) -> int:
        """The weight version currently serving."""
        return self._version

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        """Sample `sampling.n` completions for each prompt (token ids) -> one GenerationResult per prompt."""

    def start_stream(self) -> EngineStream:
        """A continuous-batching stream over this engine (see EngineStream); engines that
        lack one raise NotImplementedError and callers use generate()."""
        raise NotImplementedError(f"{type(self).__name__} has no streaming API; use generate()")

    @abc.abstractmethod
    def load_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        """Replace all weights (HF names) and set `version`; raises WeightLoadError and keeps the old
        weights and version when a tensor is missing, unknown or mis-shaped."""

    def collective_link(self) -> Any:
        """The member side of the collective weight data plane for this engine
        (`rlrt_core.weights.collective`): by default a receiver thread in this process whose
        staged versions go through `load_weights`."""
        from rlrt_core.weights.collective import LocalCollectiveLink

        return LocalCollectiveLink(self.load_weights)

    def close(self) -> None:
        """Release the engine's resources (worker processes, shared-memory files)."""
        self._closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_request(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> None:
        """Clear errors for requests no engine can serve."""
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("generate: empty prompt list")
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty or not a list of token ids")
            if not all(isinstance(t, int) for t in p):
                raise ValueError(f"generate: prompt {i} holds non-integer token ids")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"generate: prompt {i} holds token id {bad} outside the vocabulary [0, {self.vocab_size})")
            if len(p) >= self.max_model_len:
                raise ValueError(
                    f"generate: prompt {i} has {len(p)} tokens; the context holds {self.max_model_len} "
                    "(prompt + at least one new token)"
                )


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Sample one token per row. logits: [B, V] -> (token ids [B], behaviour log-probs [B]).

    The log-prob is that of the distribution sampled from: softmax(logits / T) truncated to the
    top-p nucleus and renormalised (as vLLM's processed_logprobs). The nucleus keeps, in
    descending order, every token whose preceding mass is < top_p (so at least one token).
    """
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_logits, dim=-1)
        before = sorted_p.cumsum(-1) - sorted_p
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
