"""Pure torch/transformers generation engine (CPU or one GPU).

Batched decoding with a KV cache: prompts are left-padded, each distinct prompt is prefilled
once and its cache repeated n times, then all rows decode together; rows that finished (EOS,
`max_new_tokens`, or the context limit) are dropped from the batch and the cache. Sampling
(temperature, top-p) and behaviour log-probs follow `base.sample_next`. A seed fixes the whole
call: the same (prompts, sampling, weights) give the same completions.

`start_stream()` gives a `TorchStream`: continuous batching at group granularity. Each step
decodes the live rows by one token; prompts added meanwhile are prefilled on their own and
merged into the batch's KV cache (the shorter of the two caches is left-padded, padding is
masked out and every row carries its own position ids, so a row's logits do not depend on its
batch-mates beyond float rounding); finished rows leave the batch, and cache columns that no
live row uses any more are trimmed. Each group samples from its own generator, consumed in
the same order as `generate()` on that prompt alone, so a stream with a group's seed yields
the completions `generate([prompt], seed)` yields (up to float rounding of the logits).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
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
        P = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits at column P-1
            input_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        # n samples per prompt share one prefill
        n = sp.n
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            attn = attn.repeat_interleave(n, dim=0)
        next_pos = attn.sum(-1)  # [R] position of the next token of each row
        limits = torch.tensor([min(sp.max_new_tokens, self.max_model_len - len(p)) for p in prompts for _ in range(n)])
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
                cache.batch_select_indices(keep.to(dev))
                active, tok, attn, next_pos = active[keep], tok[keep.to(dev)], attn[keep.to(dev)], next_pos[keep.to(dev)]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        return [(toks[r], lps[r], reasons[r]) for r in range(R)]


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


def _pad_cache_left(cache, pad: int) -> None:
    """Prepend `pad` zero columns to every layer's keys/values ([B, H, L, D])."""
    if pad <= 0:
        return
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
        layer.values = F.pad(layer.values, (0, 0, pad, 0))


class TorchStream(EngineStream):
    """Continuous batching on a TorchEngine; see the module docstring and EngineStream.

    Batch state: `cache` (DynamicCache, width W), `attn` [R, W] (1 = a real token of that row),
    `next_pos` [R] (position of each row's pending token), `pending` [R] (the token sampled last
    step, not yet in the cache), and per row its group and index within the group. A group's rows
    are contiguous and keep their order, so each group samples its live rows in one call.
    """

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self._queue: list[_Group] = []
        self._row_group: list[_Group] = []
        self._row_idx: list[int] = []
        self._cache = None
        self._attn: Tensor | None = None
        self._next_pos: Tensor | None = None
        self._pending: Tensor | None = None
        self._eos = torch.tensor(sorted(engine.eos_ids), device=engine.device)

    @property
    def groups(self) -> int:
        return len(self._queue) + len({id(g) for g in self._row_group})

    @property
    def rows(self) -> int:
        return len(self._row_group)

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
        self._cache = self._attn = self._next_pos = self._pending = None
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
        attn = torch.cat([self._attn, self._attn.new_ones((self._attn.shape[0], 1))], dim=1)
        out = self.engine.model(input_ids=self._pending[:, None], attention_mask=attn,
                                position_ids=self._next_pos[:, None], past_key_values=self._cache, use_cache=True)
        self._cache, self._attn = out.past_key_values, attn
        self._next_pos = self._next_pos + 1
        return out.logits[:, -1]

    def _admit(self, groups: list[_Group]) -> Tensor:
        """Prefill each new prompt once, repeat its cache n times, merge into the batch. -> logits [R_new, V]."""
        eng, dev = self.engine, self.engine.device
        P = max(len(g.prompt_ids) for g in groups)
        ids = torch.full((len(groups), P), eng.pad_id, dtype=torch.long)
        attn = torch.zeros((len(groups), P), dtype=torch.long)
        for i, g in enumerate(groups):  # left padding, as in generate()
            ids[i, P - len(g.prompt_ids):] = torch.tensor(g.prompt_ids, dtype=torch.long)
            attn[i, P - len(g.prompt_ids):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = eng.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
        reps = torch.tensor([g.sampling.n for g in groups], device=dev)
        if int(reps.max()) > 1:  # n samples per prompt share one prefill
            index = torch.repeat_interleave(torch.arange(len(groups), device=dev), reps)
            cache.batch_select_indices(index)
            logits, attn = logits[index], attn[index]
        for g in groups:
            n = g.sampling.n
            g.toks, g.lps, g.vers = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
            g.reasons, g.live = ["length"] * n, n
            self._row_group.extend([g] * n)
            self._row_idx.extend(range(n))
        next_pos = attn.sum(-1)
        if self._cache is None:
            self._cache, self._attn, self._next_pos = cache, attn, next_pos
        else:  # right-align both caches on one width, then stack the rows
            W, Wn = self._attn.shape[1], attn.shape[1]
            _pad_cache_left(self._cache, Wn - W)
            _pad_cache_left(cache, W - Wn)
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([old.keys, new.keys])
                old.values = torch.cat([old.values, new.values])
            width = max(W, Wn)
            self._attn = torch.cat([F.pad(self._attn, (width - W, 0)), F.pad(attn, (width - Wn, 0))])
            self._next_pos = torch.cat([self._next_pos, next_pos])
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
        if not keep:
            self._row_group, self._row_idx = [], []
            self._cache = self._attn = self._next_pos = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self._cache.batch_select_indices(idx)
        self._attn, self._next_pos = self._attn[idx], self._next_pos[idx]
        self._row_group = [self._row_group[r] for r in keep]
        self._row_idx = [self._row_idx[r] for r in keep]
        # the attention mask covers the cache; the pending token's column is added next step
        used = torch.nonzero(self._attn.any(0)).flatten()
        first = int(used[0]) if len(used) else 0
        if first > 0:  # columns only finished rows used
            self._attn = self._attn[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _result(self, g: _Group) -> GenerationResult:
        tokzr = self.engine.tokenizer
        comps = []
        for ids, lps, vers, reason in zip(g.toks, g.lps, g.vers, g.reasons):
            text = tokzr.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)
            comps.append(Completion(token_ids=ids, logprobs=lps, finish_reason=reason, text=text, token_versions=vers))
        return GenerationResult(prompt_ids=list(g.prompt_ids), completions=comps,
                                version=min(v for c in comps for v in c.token_versions))
