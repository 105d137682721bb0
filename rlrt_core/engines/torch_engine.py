"""Pure torch/transformers generation engine (CPU or one GPU).

Batched decoding with a KV cache: prompts are left-padded, each distinct prompt is prefilled
once and its keys/values copied into n rows of a `KVSlots` cache (kv_slots.py), then all rows
decode together; rows that finished (EOS, `max_new_tokens`, or the context limit) are dropped
from the batch and the cache. Sampling
(temperature, top-p) and behaviour log-probs follow `base.sample_next`. A seed fixes the whole
call: the same (prompts, sampling, weights) give the same completions.

`start_stream()` gives a `TorchStream`: continuous batching at group granularity. Each step
decodes the live rows by one token; prompts added meanwhile are prefilled on their own and
their rows appended to the stream's `KVSlots` (kv_slots.py: pre-allocated buffers, each row's
tokens from column 0, new keys written in place, attention over grouped KV heads with a
per-row length mask, so a row's logits do not depend on its batch-mates beyond float rounding
and a step copies no cache); finished rows leave the batch. Each group samples from its own generator, consumed in
the same order as `generate()` on that prompt alone, so a stream with a group's seed yields
the completions `generate([prompt], seed)` yields (up to float rounding of the logits).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from rlrt_core.engines.base import (
    Completion,
    Engine,
    EngineStream,
    FinishedGroup,
    GenerationResult,
    ParamSpec,
    SamplingParams,
    collect_weights,
    sample_next,
)
from rlrt_core.engines.kv_slots import KVSlots
from rlrt_core.models import load_model, load_tokenizer


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id,
                tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    if not ids:
        raise ValueError("model and tokenizer define no EOS token; completions could never stop")
    return ids


class TorchEngine(Engine):
    """transformers model + own decoding loop. See module docstring."""

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str = "cpu",
                 cache_dir: str | None = None, version: int = 0, max_model_len: int | None = None) -> None:
        super().__init__(version)
        self.model = load_model(model_path, dtype=dtype, device=device, cache_dir=cache_dir)
        self.tokenizer = load_tokenizer(model_path, cache_dir=cache_dir)
        self.device = torch.device(device)
        ctx = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or 4096
        self.max_model_len = min(ctx, max_model_len) if max_model_len else ctx
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        optional = frozenset({"lm_head.weight"}) if tied and "lm_head.weight" in params else frozenset()
        partner = {"lm_head.weight": n for n, p in params.items()
                   if optional and n != "lm_head.weight" and p is params["lm_head.weight"]}
        self._params = params
        self._spec = ParamSpec({n: tuple(p.shape) for n, p in params.items()}, optional, partner)

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        """Copy a full state dict (HF names) into the model in place; see Engine.load_weights."""
        new = collect_weights(weights, self._spec)  # validates everything before touching the model
        with self._lock, torch.no_grad():
            for name, tensor in new.items():
                self._params[name].copy_(tensor.to(self._params[name].dtype))
            self._version = int(version)

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        """n completions per prompt; see Engine.generate and the module docstring."""
        self.check_request(prompts, sampling)
        with self._lock, torch.no_grad():
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            rows = self._decode([list(p) for p in prompts], sampling, gen)
            version = self._version
        out: list[GenerationResult] = []
        for i, p in enumerate(prompts):
            comps = []
            for ids, lps, reason in rows[i * sampling.n : (i + 1) * sampling.n]:
                text_ids = ids[:-1] if reason == "stop" else ids
                text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                comps.append(Completion(token_ids=ids, logprobs=lps, finish_reason=reason, text=text,
                                        token_versions=[version] * len(ids)))
            out.append(GenerationResult(prompt_ids=list(p), completions=comps, version=version))
        return out

    def start_stream(self) -> "TorchStream":
        """A continuous-batching stream on this engine's model (see TorchStream)."""
        return TorchStream(self)

    def _decode(self, prompts: list[list[int]], sp: SamplingParams, gen: torch.Generator
                ) -> list[tuple[list[int], list[float], str]]:
        dev = self.device
        n = sp.n  # n samples per prompt share one prefill; the rows decode on KVSlots (see kv_slots.py)
        index = torch.arange(len(prompts), device=dev).repeat_interleave(n)
        kv = KVSlots.for_model(self.model, max_width=self.max_model_len)
        limits = torch.tensor([min(sp.max_new_tokens, self.max_model_len - len(p)) for p in prompts for _ in range(n)])
        logits = _prefill_into(self, prompts, kv, index, limits)
        R = len(prompts) * n
        toks: list[list[int]] = [[] for _ in range(R)]
        lps: list[list[float]] = [[] for _ in range(R)]
        reasons = ["length"] * R
        active = torch.arange(R)  # original row index of each live batch row
        eos = torch.tensor(sorted(self.eos_ids), device=dev)
        step = 0
        while True:
            tok, lp = sample_next(logits, sp.temperature, sp.top_p, gen)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            for j, r in enumerate(active.tolist()):
                toks[r].append(tok_l[j])
                lps[r].append(lp_l[j])
            step += 1
            is_eos = torch.isin(tok, eos).cpu()
            done = is_eos | (limits[active] <= step)
            for j in torch.nonzero(is_eos).flatten().tolist():
                reasons[active[j]] = "stop"
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = torch.nonzero(~done).flatten()
                kv.keep(keep.to(dev))
                active, tok = active[keep], tok[keep.to(dev)]
            logits = kv.decode(self.model, tok)
        return [(toks[r], lps[r], reasons[r]) for r in range(R)]


def _prefill_into(eng: TorchEngine, prompts: list[list[int]], kv: KVSlots, index: Tensor, limits: Tensor) -> Tensor:
    """Prefill `prompts` once (left-padded, per-row positions) and append rows to `kv`: row j copies
    prompt index[j] and may add up to limits[j] tokens. -> the first-token logits of the new rows
    [len(index), V]."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), eng.pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt's last token sits at column P-1
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):] = 1
    ids, attn = ids.to(eng.device), attn.to(eng.device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = eng.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    kv.append(out.past_key_values, attn, index, limits)
    return out.logits[:, -1][index]


def _seeded(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


@dataclass
class _Group:
    key: Any
    prompt_ids: list[int]
    sampling: SamplingParams
    gen: torch.Generator
    limit: int  # new tokens allowed per row
    added_at: float
    toks: list[list[int]] = field(default_factory=list)
    lps: list[list[float]] = field(default_factory=list)
    vers: list[list[int]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    live: int = 0


class TorchStream(EngineStream):
    """Continuous batching on a TorchEngine; see the module docstring and EngineStream.

    Batch state: `kv` (KVSlots: each row's cached tokens at columns 0 .. lens[r]-1, so lens[r] is
    the position of its pending token), `pending` [R] (the token sampled last step, not yet in the
    cache), and per row its group and index within the group. A group's rows are contiguous and
    keep their order, so each group samples its live rows in one call.
    """

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self._queue: list[_Group] = []
        self._row_group: list[_Group] = []
        self._row_idx: list[int] = []
        self._kv = KVSlots.for_model(engine.model, max_width=engine.max_model_len)
        self._pending: Tensor | None = None
        self._eos = torch.tensor(sorted(engine.eos_ids), device=engine.device)

    @property
    def groups(self) -> int:
        return len(self._queue) + len({id(g) for g in self._row_group})

    @property
    def cache_width(self) -> int:
        """KV-cache columns the next decode step attends over (the longest live row + 1)."""
        return self._kv.width

    @property
    def rows(self) -> int:
        """Live rows plus the n rows of each queued group; a finished completion frees its row at
        once, even while its group waits for a slower sibling."""
        return len(self._row_group) + sum(g.sampling.n for g in self._queue)

    def add(self, key: Any, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Queue one group; it joins the batch at the next step(). See EngineStream.add."""
        eng = self.engine
        eng.check_request([prompt_ids], sampling)
        limit = min(sampling.max_new_tokens, eng.max_model_len - len(prompt_ids))
        self._queue.append(_Group(key=key, prompt_ids=list(prompt_ids), sampling=sampling,
                                  gen=_seeded(eng.device, sampling.seed), limit=limit, added_at=time.monotonic()))

    def abort(self) -> list[Any]:
        keys = [g.key for g in self._queue]
        seen: set[int] = set()
        for g in self._row_group:
            if id(g) not in seen:
                seen.add(id(g))
                keys.append(g.key)
        self._queue.clear()
        self._row_group, self._row_idx = [], []
        self._kv.keep(self._kv.lens[:0])
        self._pending = None
        return keys

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[FinishedGroup]:
        """Decode live rows by one token, prefill queued groups, sample, retire finished rows."""
        eng = self.engine
        with eng._lock, torch.no_grad():
            version = eng.version  # the weights every logit of this step comes from
            logits = self._decode_live()
            if self._queue:
                new_logits = self._admit(self._queue)
                self._queue = []
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
            if logits is None:
                return []
            return self._sample_and_retire(logits, version)

    def _decode_live(self) -> Tensor | None:
        if not self._row_group:
            return None
        return self._kv.decode(self.engine.model, self._pending)

    def _admit(self, groups: list[_Group]) -> Tensor:
        """Prefill each new prompt once and append its n rows to the slots. -> logits [R_new, V]."""
        dev = self.engine.device
        reps = torch.tensor([g.sampling.n for g in groups], device=dev)
        index = torch.repeat_interleave(torch.arange(len(groups), device=dev), reps)  # n rows share a prefill
        limits = torch.tensor([g.limit for g in groups for _ in range(g.sampling.n)])
        logits = _prefill_into(self.engine, [g.prompt_ids for g in groups], self._kv, index, limits)
        for g in groups:
            n = g.sampling.n
            g.toks, g.lps, g.vers = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
            g.reasons, g.live = ["length"] * n, n
            self._row_group.extend([g] * n)
            self._row_idx.extend(range(n))
        return logits

    def _sample_and_retire(self, logits: Tensor, version: int) -> list[FinishedGroup]:
        R = len(self._row_group)
        tok = torch.empty(R, dtype=torch.long, device=logits.device)
        lp = torch.empty(R, dtype=torch.float32, device=logits.device)
        start = 0
        while start < R:  # each group's contiguous rows, sampled with its own generator
            g = self._row_group[start]
            end = start
            while end < R and self._row_group[end] is g:
                end += 1
            t, lpr = sample_next(logits[start:end], g.sampling.temperature, g.sampling.top_p, g.gen)
            tok[start:end], lp[start:end] = t, lpr
            start = end
        is_eos = torch.isin(tok, self._eos).tolist()
        tok_l, lp_l = tok.tolist(), lp.tolist()
        keep, finished = [], []
        now = time.monotonic()
        for r in range(R):
            g, i = self._row_group[r], self._row_idx[r]
            g.toks[i].append(tok_l[r])
            g.lps[i].append(lp_l[r])
            g.vers[i].append(version)
            if is_eos[r]:
                g.reasons[i] = "stop"
            if is_eos[r] or len(g.toks[i]) >= g.limit:
                g.live -= 1
                if g.live == 0:
                    finished.append(FinishedGroup(key=g.key, result=self._result(g), added_at=g.added_at,
                                                  finished_at=now))
            else:
                keep.append(r)
        if len(keep) < R:
            self._retire(keep)
        self._pending = tok if len(keep) == R else tok[torch.tensor(keep, dtype=torch.long, device=tok.device)]
        return finished

    def _retire(self, keep: list[int]) -> None:
        self._kv.keep(torch.tensor(keep, dtype=torch.long, device=self.engine.device))
        self._row_group = [self._row_group[r] for r in keep]
        self._row_idx = [self._row_idx[r] for r in keep]

    def _result(self, g: _Group) -> GenerationResult:
        tokzr = self.engine.tokenizer
        comps = []
        for ids, lps, vers, reason in zip(g.toks, g.lps, g.vers, g.reasons):
            text = tokzr.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)
            comps.append(Completion(token_ids=ids, logprobs=lps, finish_reason=reason, text=text, token_versions=vers))
        return GenerationResult(prompt_ids=list(g.prompt_ids), completions=comps,
                                version=min(v for c in comps for v in c.token_versions))
