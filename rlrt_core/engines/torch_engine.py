"""Pure torch/transformers generation engine (CPU or one GPU).

Batched decoding with a KV cache: prompts are left-padded, each distinct prompt is prefilled
once and its cache repeated n times, then all rows decode together; rows that finished (EOS,
`max_new_tokens`, or the context limit) are dropped from the batch and the cache. Sampling
(temperature, top-p) and behaviour log-probs follow `base.sample_next`. A seed fixes the whole
call: the same (prompts, sampling, weights) give the same completions.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
from torch import Tensor

from rlrt_core.engines.base import (
    Completion,
    Engine,
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
                comps.append(Completion(token_ids=ids, logprobs=lps, finish_reason=reason, text=text))
            out.append(GenerationResult(prompt_ids=list(p), completions=comps, version=version))
        return out

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
