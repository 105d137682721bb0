"""Chunked scoring equals the naive full log-softmax, with and without gradients."""

from __future__ import annotations

import random

import pytest
import torch

from rlrt_core.models import load_model
from rlrt_core.scoring import ScoreResult, score_tokens, score_views

TOL = 1e-5
# Log-probs reach ~-14 nats and come from a log-sum-exp over 49k float32 terms whose summation
# order differs between the chunked and the naive path (and between CPUs' kernels: an AMD EPYC
# gave 1.05e-5 at a value of -13.8): a few float32 ulps of the value, hence a relative term too.
LP_RTOL = 2e-6


def _grad_close(got, want, name):
    # Gradients are sums over every token and vocabulary row (the tied embedding's most of all);
    # their rounding scales with the tensor's magnitude, not each element's.
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from a second thread, and on a loaded 2-core machine OpenMP's
    # spinning threads made decoding ~10x slower (measured); restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny")


def _batch(seed: int, B: int = 5, vocab: int = 49152) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(B)]
    responses = [[rng.randrange(vocab) for _ in range(rng.randint(0, 9))] for _ in range(B)]
    responses[0] = [rng.randrange(vocab) for _ in range(9)]  # at least one non-empty row
    return prompts, responses


def _naive(model, prompts, responses, temperature=1.0, grad=False):
    """Reference: one unpadded sequence at a time, full [T, V] log-softmax."""
    out_lp, out_ent, out_full = [], [], []
    with torch.set_grad_enabled(grad):
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logits = model(ids).logits[0, len(p) - 1 : len(p) + len(r) - 1].float() / temperature
            logp = torch.log_softmax(logits, -1)
            out_full.append(logp)
            out_lp.append(logp.gather(-1, torch.tensor(r, dtype=torch.long)[:, None]).squeeze(-1))
            out_ent.append(-(logp.exp() * logp).sum(-1))
    return out_lp, out_ent, out_full


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive(model, chunk_size, temperature):
    prompts, responses = _batch(1)
    res = score_tokens(model, prompts, responses, temperature=temperature, with_entropy=True, topk=5,
                       chunk_size=chunk_size)
    lp, ent, full = _naive(model, prompts, responses, temperature)
    T = max(len(r) for r in responses)
    assert res.logprobs.shape == (len(prompts), T) and res.mask.shape == (len(prompts), T)
    assert res.topk_ids.shape == (len(prompts), T, 5) and res.topk_logprobs.shape == (len(prompts), T, 5)
    for i, r in enumerate(responses):
        n = len(r)
        assert res.mask[i].tolist() == [True] * n + [False] * (T - n)
        torch.testing.assert_close(res.logprobs[i, :n], lp[i], atol=TOL, rtol=LP_RTOL)
        # entropy sums 49k float32 terms (values up to ~11 nats): measured agreement 2e-6 relative
        torch.testing.assert_close(res.entropy[i, :n], ent[i], atol=TOL, rtol=1e-5)
        assert torch.all(res.logprobs[i, n:] == 0) and torch.all(res.entropy[i, n:] == 0)
        if n:
            ref_vals, _ = full[i].topk(5, -1)
            torch.testing.assert_close(res.topk_logprobs[i, :n], ref_vals, atol=TOL, rtol=LP_RTOL)
            # the returned ids index exactly those log-probs
            torch.testing.assert_close(full[i].gather(-1, res.topk_ids[i, :n]), res.topk_logprobs[i, :n],
                                       atol=TOL, rtol=LP_RTOL)


def test_prompt_lengths_and_batching_do_not_change_scores(model):
    prompts, responses = _batch(2, B=6)
    together = score_tokens(model, prompts, responses)
    for i in range(len(prompts)):
        alone = score_tokens(model, [prompts[i]], [responses[i]])
        n = len(responses[i])
        torch.testing.assert_close(together.logprobs[i, :n], alone.logprobs[0, :n], atol=TOL, rtol=LP_RTOL)


def test_grad_matches_naive_gradients(model):
    prompts, responses = _batch(3, B=3)
    model.zero_grad(set_to_none=True)
    res = score_tokens(model, prompts, responses, with_entropy=True, chunk_size=4, grad=True)
    assert res.logprobs.requires_grad and res.entropy.requires_grad
    (res.logprobs.sum() + 0.1 * res.entropy.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    lp, ent, _ = _naive(model, prompts, responses, grad=True)
    (sum(x.sum() for x in lp) + 0.1 * sum(x.sum() for x in ent)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert set(got) == set(ref) and "model.embed_tokens.weight" in got
    for name in ref:
        _grad_close(got[name], ref[name], name)


def test_no_grad_by_default(model):
    prompts, responses = _batch(4, B=2)
    res = score_tokens(model, prompts, responses)
    assert not res.logprobs.requires_grad
    assert res.entropy is None and res.topk_ids is None and res.topk_logprobs is None


def test_score_views_equals_two_calls(model):
    prompts, responses = _batch(5, B=3)
    teacher = [[7, 8, 9] + p for p in prompts]
    s, t = score_views(model, prompts, teacher, responses, topk=3, with_entropy=True)
    assert isinstance(s, ScoreResult) and isinstance(t, ScoreResult)
    s2 = score_tokens(model, prompts, responses, topk=3, with_entropy=True)
    t2 = score_tokens(model, teacher, responses, topk=3, with_entropy=True)
    assert torch.equal(s.mask, t.mask)
    torch.testing.assert_close(s.logprobs, s2.logprobs, atol=TOL, rtol=LP_RTOL)
    torch.testing.assert_close(t.logprobs, t2.logprobs, atol=TOL, rtol=LP_RTOL)
    # the privileged prefix changes the teacher's view of the very same tokens
    assert not torch.allclose(s.logprobs[s.mask], t.logprobs[t.mask])


def test_all_empty_responses(model):
    res = score_tokens(model, [[1, 2], [3]], [[], []], with_entropy=True, topk=2)
    assert res.logprobs.shape == (2, 0) and res.topk_ids.shape == (2, 0, 2)


@pytest.mark.parametrize(
    "prompts,responses,kwargs,match",
    [
        ([], [], {}, "empty batch"),
        ([[1]], [[1], [2]], {}, "1 prompts but 2 responses"),
        ([[]], [[1]], {}, r"prompt_ids\[0\] is empty"),
        ([[1]], [[49152]], {}, r"response_ids\[0\] holds token id 49152 outside"),
        ([[-1]], [[1]], {}, r"prompt_ids\[0\] holds token id -1"),
        ([[1] * 2000], [[1] * 100], {}, "more than the model's context of 2048"),
        ([[1]], [[1]], {"temperature": 0.0}, "temperature must be > 0"),
        ([[1]], [[1]], {"chunk_size": 0}, "chunk_size must be >= 1"),
        ([[1]], [[1]], {"topk": -1}, "topk must be in"),
    ],
)
def test_bad_input(model, prompts, responses, kwargs, match):
    with pytest.raises(ValueError, match=match):
        score_tokens(model, prompts, responses, **kwargs)


def test_score_views_mismatched_prompts(model):
    with pytest.raises(ValueError, match="2 student prompts but 1 teacher prompts"):
        score_views(model, [[1], [2]], [[1]], [[3], [4]])


def test_shared_prefix_matches_unshared_values_and_gradients():
    """GRPO groups repeat a prompt K times; running it once must not change any number."""
    from rlrt_core.models import load_model

    model = load_model("tiny")
    prompts = [[1, 5, 6, 7]] * 3 + [[1, 9, 9]] * 2 + [[2, 3]]
    resps = [[10, 11, 12], [13], [14, 15, 16, 17], [18, 19], [], [20]]
    a = score_tokens(model, prompts, resps, share_prefix=False, with_entropy=True, topk=3)
    b = score_tokens(model, prompts, resps, share_prefix=True, with_entropy=True, topk=3)
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.equal(a.topk_ids, b.topk_ids)
    grads = []
    for share in (False, True):
        model.zero_grad()
        score_tokens(model, prompts, resps, grad=True, share_prefix=share).logprobs.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("share", [False, True])
def test_support_logprobs_equal_naive_gather_with_gradient(model, share):
    prompts, responses = _batch(7, B=4)
    if share:  # the K samples of a group share the prompt: the shared-prefix path
        prompts = [prompts[0]] * 4
    T = max(len(r) for r in responses)
    support = torch.randint(0, 49152, (4, T + 2, 3), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    res = score_tokens(model, prompts, responses, support_ids=support, chunk_size=5, grad=True, share_prefix=share)
    assert res.support_logprobs.shape == (4, T, 3) and res.support_logprobs.requires_grad
    res.support_logprobs[res.mask].sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, _, full = _naive(model, prompts, responses, grad=True)
    ref_sum = 0
    for i, r in enumerate(responses):
        n = len(r)
        ref = full[i].gather(-1, support[i, :n])
        torch.testing.assert_close(res.support_logprobs[i, :n].detach(), ref.detach(), atol=TOL, rtol=LP_RTOL)
        assert torch.all(res.support_logprobs[i, n:] == 0)
        ref_sum = ref_sum + ref.sum()
    ref_sum.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            _grad_close(got[name], p.grad, name)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="support_ids"):
        score_tokens(model, prompts, responses, support_ids=support[:, :1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_tokens(model, prompts, responses, support_ids=support + 49152)
