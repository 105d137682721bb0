"""Log-probabilities of given response tokens under a prompt, computed in chunks.

A naive scorer materialises `log_softmax(logits)` as a `[B, T, V]` float32 tensor (16 x 1024 x 49152
x 4 B = 3.2 GB for SmolLM2's vocabulary, twice that with the logits). Here the transformer body runs
once, the hidden states of the scored positions only (response tokens, no padding, no prompt) are
gathered into `[N, H]`, and `lm_head` + `logsumexp` run over `chunk_size` rows at a time:

    log p(y_t) = logit[y_t] / tau - logsumexp(logits / tau)

The same pass yields per-token entropy and top-k log-prob rows (for D̄_t = KL(P_S || P_T) and SDPO).
With `grad=True` (the learner) each chunk runs under `torch.utils.checkpoint`, so backward
recomputes one chunk's logits at a time and peak memory stays `chunk_size x V`, not `N x V`.

Layout: sequence i is `prompt_ids[i] + response_ids[i]`, right-padded; position ids are the natural
0..L-1 of each row, so prompts of different lengths need no special handling, and no real token
ever attends to padding (it only lies after it under the causal mask). Results are right-padded
`[B, T]` with T the longest response, 0 (and mask False) at padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class ScoreResult:
    """Per-token scores of right-padded responses.

    logprobs: [B, T] float32, log p(y_t | prompt, y<t) at the given temperature, 0 at padding.
    mask: [B, T] bool, True at real response tokens.
    entropy: [B, T] float32 entropy of the full next-token distribution (0 at padding), or None.
    topk_ids: [B, T, k] int64 ids of the k most likely next tokens, or None.
    topk_logprobs: [B, T, k] float32 their log-probs (full-vocabulary normalisation), or None.
    support_logprobs: [B, T, s] float32 log-probs at the given `support_ids`, or None.
    """

    logprobs: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    support_logprobs: Tensor | None = None


def _head_and_body(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise ValueError(
            f"{type(model).__name__} is not a causal LM with a separate body and lm_head; cannot score in chunks"
        )
    return head, body


def _check_ids(name: str, rows: Sequence[Sequence[int]], vocab: int) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"{name}[{i}] must be a list of token ids, got {type(row).__name__}")
        if row:
            lo, hi = min(row), max(row)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{name}[{i}] holds token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab})")


def _validate(model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              temperature: float, topk: int, chunk_size: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("score_tokens: empty batch (no prompts)")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"score_tokens: {len(prompt_ids)} prompts but {len(response_ids)} responses; need one response per prompt"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 0 <= topk <= vocab:
        raise ValueError(f"topk must be in [0, {vocab}], got {topk}")
    _check_ids("prompt_ids", prompt_ids, vocab)
    _check_ids("response_ids", response_ids, vocab)
    max_len = getattr(model.config, "max_position_embeddings", None)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty; the first response token needs a preceding token")
        if max_len is not None and len(p) + len(r) > max_len:
            raise ValueError(
                f"sequence {i} has {len(p)} prompt + {len(r)} response tokens, more than the model's context "
                f"of {max_len}"
            )


def _chunk_scores(head: torch.nn.Module, softcap: float | None, temperature: float, with_entropy: bool,
                  topk: int, h: Tensor, y: Tensor, support: Tensor | None = None) -> tuple[Tensor, ...]:
    """Scores of one chunk. h: [n, H] hidden states, y: [n] target ids, support: [n, s] ids or None
    -> (logprob [n], entropy [n]?, topk ids [n, k]?, topk logprobs [n, k]?, support logprobs [n, s]?).
    Only this function ever holds an [n, V] tensor."""
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)  # [n, V]; fused forward and backward kernels
    del logits
    out: list[Tensor] = [logp.gather(-1, y[:, None]).squeeze(-1)]
    if with_entropy:
        # -sum p log p, not logsumexp - E_p[logit]: the latter cancels two large numbers in float32
        out.append(-(logp.exp() * logp).sum(-1))
    if topk:
        vals, ids = logp.topk(topk, dim=-1)
        out.extend([ids, vals])
    if support is not None:
        out.append(logp.gather(-1, support))
    return tuple(out)


def score_tokens(model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                 temperature: float = 1.0, with_entropy: bool = False, topk: int = 0, chunk_size: int = 256,
                 grad: bool = False, share_prefix: bool = True, support_ids: Tensor | None = None) -> ScoreResult:
    """Log-probs of `response_ids[i]` following `prompt_ids[i]`, chunked over scored positions.

    prompt_ids: B lists of ids (any lengths >= 1); response_ids: B lists (may be empty).
    temperature: logits are divided by it (behaviour log-probs are at the sampling temperature).
    with_entropy: also return the per-token entropy [B, T].
    topk: also return the k most likely ids and their log-probs [B, T, k] (0 = off).
    chunk_size: scored token positions (over the whole batch) per lm_head chunk; peak extra memory
        is about 2-3 x chunk_size x V x 4 bytes.
    grad: keep autograd (learner); each chunk is checkpointed so backward also stays chunked.
    share_prefix: when rows repeat a prompt (the K samples of a GRPO group), run each distinct
        prompt once and its responses on the repeated KV cache: same values, about K x less
        prompt compute (see `_hidden_shared_prefix`).
    support_ids: [B, >= T, s] long ids; also return the log-probs at those ids per position
        ([B, T, s], `support_logprobs`; with gradient when `grad`). SDPO: the teacher view at the
        student's top-k ids (teacher scorer), the student view at them (learner).
    Returns a ScoreResult of right-padded [B, T] tensors on the model's device (T = longest response).
    """
    _validate(model, prompt_ids, response_ids, temperature, topk, chunk_size)
    if support_ids is not None:
        _validate_support(model, support_ids, len(prompt_ids), max(len(r) for r in response_ids))
    head, body = _head_and_body(model)
    device = model.get_output_embeddings().weight.device
    B = len(prompt_ids)
    resp_lens = [len(r) for r in response_ids]
    T = max(resp_lens)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, n in enumerate(resp_lens):
        mask[i, :n] = True

    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(B, T, *shape, dtype=dtype, device=device)

    n_support = support_ids.shape[-1] if support_ids is not None else 0
    if T == 0:
        return ScoreResult(empty(), mask, empty() if with_entropy else None,
                           empty(topk, dtype=torch.long) if topk else None, empty(topk) if topk else None,
                           empty(n_support) if support_ids is not None else None)

    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    L = max(len(s) for s in seqs)
    pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None or isinstance(pad, list) else int(pad)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    # Scored positions, row-major (the order of mask's True entries): logits at position
    # len(p)-1+j predict response token j.
    rows = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(resp_lens)])
    cols = torch.cat([torch.arange(n, dtype=torch.long) + len(p) - 1 for p, n in zip(prompt_ids, resp_lens)])
    targets = torch.cat([torch.tensor(list(r), dtype=torch.long) for r in response_ids if r]).to(device)

    # Support ids of the scored positions, in the same row-major order as `targets`.
    support = support_ids[:, :T].to(device=device, dtype=torch.long)[mask] if support_ids is not None else None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    n_out = 1 + int(with_entropy) + (2 if topk else 0) + int(support is not None)
    with torch.set_grad_enabled(grad):
        if share_prefix and len({tuple(p) for p in prompt_ids}) < B:
            h = _hidden_shared_prefix(body, prompt_ids, response_ids, pad, device)  # [N, H]
        else:
            # No attention mask needed: right padding only follows real tokens under the causal mask.
            hidden = body(input_ids=input_ids.to(device), use_cache=False).last_hidden_state  # [B, L, H]
            h = hidden[rows.to(device), cols.to(device)]  # [N, H]
            del hidden
        parts: list[list[Tensor]] = [[] for _ in range(n_out)]
        for s in range(0, h.shape[0], chunk_size):
            args = (head, softcap, temperature, with_entropy, topk, h[s : s + chunk_size], targets[s : s + chunk_size],
                    support[s : s + chunk_size] if support is not None else None)
            res = checkpoint(_chunk_scores, *args, use_reentrant=False) if grad else _chunk_scores(*args)
            for acc, t in zip(parts, res):
                acc.append(t)
        flat = [torch.cat(p) for p in parts]

        def scatter(values: Tensor, *shape: int) -> Tensor:
            out = empty(*shape, dtype=values.dtype)
            out[mask] = values
            return out

        it = iter(flat)
        logprobs = scatter(next(it))
        entropy = scatter(next(it)) if with_entropy else None
        topk_ids = scatter(next(it), topk) if topk else None
        topk_lp = scatter(next(it), topk) if topk else None
        support_lp = scatter(next(it), n_support) if support is not None else None
    return ScoreResult(logprobs, mask, entropy, topk_ids, topk_lp, support_lp)


def _validate_support(model: Any, support_ids: Tensor, batch: int, longest: int) -> None:
    if not isinstance(support_ids, Tensor) or support_ids.ndim != 3:
        raise ValueError(f"support_ids must be a [B, T, s] tensor, got {getattr(support_ids, 'shape', support_ids)!r}")
    if support_ids.dtype.is_floating_point or support_ids.dtype == torch.bool:
        raise ValueError(f"support_ids must hold integer token ids, got dtype {support_ids.dtype}")
    b, t, s = support_ids.shape
    if b != batch or t < longest or s < 1:
        raise ValueError(f"support_ids has shape {tuple(support_ids.shape)}; need [{batch}, >= {longest}, >= 1]")
    vocab = model.get_output_embeddings().weight.shape[0]
    if support_ids.numel() and (int(support_ids.min()) < 0 or int(support_ids.max()) >= vocab):
        raise ValueError(f"support_ids hold ids outside the vocabulary [0, {vocab})")


def _hidden_shared_prefix(body: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                          response_ids: Sequence[Sequence[int]], pad: int, device: torch.device) -> Tensor:
    """Hidden states [N, H] of the scored positions (row-major, as `score_tokens` orders them),
    running every distinct prompt once.

    For a prompt p shared by rows R: one pass over p gives its KV cache and the hidden state
    at p's last token (which predicts response token 0); the cache is repeated |R| times and
    the right-padded responses run on it (position ids continue at len(p)), giving the hidden
    states that predict response tokens 1..n-1. Gradients flow through the repeated cache into
    the prompt pass, so training sees exactly the gradients of the unshared computation."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        if response_ids[i]:
            groups.setdefault(tuple(p), []).append(i)
    per_row: dict[int, Tensor] = {}
    for prompt, idx in groups.items():
        P = len(prompt)
        out = body(input_ids=torch.tensor([prompt], dtype=torch.long, device=device), use_cache=True)
        last = out.last_hidden_state[0, -1:]  # [1, H]: predicts response token 0
        tails = [list(response_ids[i][:-1]) for i in idx]  # inputs that predict tokens 1..n-1
        Tn = max(len(t) for t in tails)
        if Tn == 0:
            for i in idx:
                per_row[i] = last
            continue
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(idx))
        inp = torch.full((len(idx), Tn), pad, dtype=torch.long)
        for r, t in enumerate(tails):
            inp[r, : len(t)] = torch.tensor(t, dtype=torch.long)
        pos = torch.arange(P, P + Tn, device=device).unsqueeze(0).expand(len(idx), Tn)
        hid = body(input_ids=inp.to(device), past_key_values=cache, position_ids=pos,
                   use_cache=True).last_hidden_state  # [|R|, Tn, H]
        for r, i in enumerate(idx):
            per_row[i] = torch.cat([last, hid[r, : len(tails[r])]], 0)
    return torch.cat([per_row[i] for i in range(len(prompt_ids)) if i in per_row], 0)


def score_views(model: Any, student_prompt_ids: Sequence[Sequence[int]], teacher_prompt_ids: Sequence[Sequence[int]],
                response_ids: Sequence[Sequence[int]], *, temperature: float = 1.0, topk: int = 0,
                chunk_size: int = 256, with_entropy: bool = False) -> tuple[ScoreResult, ScoreResult]:
    """(student, teacher) scores of the same responses under both prompts, without gradients.

    Student view P_S = pi(. | x, y<t), teacher view P_T = pi(. | x, c, y<t); both [B, T] with the
    same mask. The two views run as two passes so the shorter student prompts are not padded to
    the teacher's length.
    """
    if len(student_prompt_ids) != len(teacher_prompt_ids):
        raise ValueError(
            f"score_views: {len(student_prompt_ids)} student prompts but {len(teacher_prompt_ids)} teacher prompts"
        )
    kw = dict(temperature=temperature, with_entropy=with_entropy, topk=topk, chunk_size=chunk_size, grad=False)
    student = score_tokens(model, student_prompt_ids, response_ids, **kw)
    teacher = score_tokens(model, teacher_prompt_ids, response_ids, **kw)
    return student, teacher


def logprob_rows(model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                 temperature: float = 1.0) -> list[Tensor]:
    """Full-vocabulary next-token log-prob rows at every response position, without gradients.

    Row j of sequence i is log pi(. | prompt_i, response_i[:j]) over the whole vocabulary: the
    distribution response token j was drawn from. For diagnostics that need all of P (KL over
    the vocabulary, arg-max of D_hat_t(v), JS divergence); memory is sum_i T_i x V x 4 bytes
    (49k vocabulary: 0.2 MB per token), so callers bound the batch.

    Returns:
        B tensors [T_i, V] float32 on the model's device (T_i = len(response_ids[i]), may be 0).
    """
    _validate(model, prompt_ids, response_ids, temperature, 0, 1)
    head, body = _head_and_body(model)
    device = head.weight.device
    softcap = getattr(model.config, "final_logit_softcapping", None)
    out: list[Tensor] = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids):
            if not r:
                out.append(torch.zeros(0, head.weight.shape[0], device=device))
                continue
            ids = torch.tensor([list(p) + list(r)[:-1]], dtype=torch.long, device=device)
            h = body(input_ids=ids, use_cache=False).last_hidden_state[0, len(p) - 1:]  # [T, H]
            logits = head(h).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            out.append(torch.log_softmax(logits / temperature, dim=-1))
    return out
