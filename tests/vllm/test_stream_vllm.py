"""Continuous batching on vLLM (`VLLMEngine.start_stream()`), on the tiny model, fp32.

Run by `make test-vllm` only (in .venv-vllm). The stream contract of tests/test_engine_stream.py,
where vLLM can be held to it: same seeds give generate()'s completions, groups come back as soon
as their own K completions end (before a slower group added earlier), and a weight update while
sequences are in flight keeps them going and keeps every behaviour log-prob exact for the
version that sampled each token (vLLM's own per-step labels, `token_versions`).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM lives in .venv-vllm (make vllm-env / make test-vllm)")

from rlrt_core.config import build_config  # noqa: E402
from rlrt_core.engines import SamplingParams, make_engine  # noqa: E402
from rlrt_core.models import load_model  # noqa: E402

pytestmark = [pytest.mark.vllm]
MAX_LEN = 256
TOL = 1e-4  # tests/test_engines.py LOGPROB_TOL["vllm"]: behaviour vs recomputed log-probs, fp32
PROMPTS = [[1, 9690, 198, 2683, 359], [1, 4093, 198, 1780, 314, 216, 34, 27, 35], [7018, 411],
           [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = build_config({"model": {"path": "tiny", "max_model_len": MAX_LEN}, "rollout": {"engine": "vllm"}},
                       use_env=False)
    eng = make_engine(cfg)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model("tiny").state_dict().items()}


def _drain(stream, results: list, limit: int = 10_000) -> int:
    steps = 0
    while stream.groups and steps < limit:
        results += stream.step()
        steps += 1
    assert stream.groups == 0, "stream did not drain"
    return steps


def test_stream_gives_generates_completions_per_group(engine):
    sps = [SamplingParams(n=4, max_new_tokens=30, seed=100 + i, temperature=t)
           for i, t in enumerate([1.0, 0.7, 1.0, 1.3])]
    refs = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, sps)]
    stream = engine.start_stream()
    done: list = []
    stream.add(0, PROMPTS[0], sps[0])
    stream.add(1, PROMPTS[1], sps[1])
    assert stream.groups == 2 and stream.rows == 8
    for _ in range(3):
        done += stream.step()
    stream.add(2, PROMPTS[2], sps[2])  # joins a running batch
    done += stream.step()
    stream.add(3, PROMPTS[3], sps[3])
    _drain(stream, done)
    got = {f.key: f.result for f in done}
    assert sorted(got) == [0, 1, 2, 3] and stream.rows == 0
    for k, ref in enumerate(refs):
        res = got[k]
        assert res.prompt_ids == PROMPTS[k] and res.version == engine.version
        assert [c.token_ids for c in res.completions] == [c.token_ids for c in ref.completions]
        assert [c.finish_reason for c in res.completions] == [c.finish_reason for c in ref.completions]
        for c, r in zip(res.completions, ref.completions):
            assert c.text == r.text and c.token_versions == [engine.version] * len(c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(c.token_ids) for r in got.values() for c in r.completions}) > 8


def test_groups_publish_before_the_slowest_finishes(engine):
    stream = engine.start_stream()
    stream.add("long", PROMPTS[1], SamplingParams(n=2, max_new_tokens=200, seed=4))
    stream.add("short", PROMPTS[0], SamplingParams(n=3, max_new_tokens=2, seed=1))
    order, step, refill_added = [], 0, False
    while stream.groups:
        for f in stream.step():
            order.append((f.key, f.finished_at, f.result))
        step += 1
        if not refill_added and order:  # a group added after the short one ended still overtakes "long"
            stream.add("refill", PROMPTS[3], SamplingParams(n=4, max_new_tokens=5, seed=3))
            refill_added = True
    keys = [k for k, _, _ in order]
    assert keys == ["short", "refill", "long"], keys
    res = {k: r for k, _, r in order}
    # this seed's completions (30 and 45 tokens on the tiny model) run far beyond the others
    assert max(len(c.token_ids) for c in res["long"].completions) > 20
    assert all(len(c.token_ids) <= 5 for c in res["refill"].completions)
    assert order[0][1] < order[1][1] < order[2][1]


def test_inflight_weight_update_keeps_behaviour_logprobs_exact(engine, base_state):
    """vLLM's mirror of the torch engine's test: tokens labelled v0 were sampled under A, the rest
    under B on top of A's KV cache of the earlier tokens; recomputing each token with its version
    reproduces the behaviour log-probs, recomputing all with B does not."""
    T = 0.9
    v0 = engine.version
    g = torch.Generator().manual_seed(9)
    new = {k: v + torch.randn(v.shape, generator=g) * 0.05 for k, v in base_state.items() if k != "lm_head.weight"}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied in this model
    stream = engine.start_stream()
    stream.add("g", PROMPTS[0], SamplingParams(n=4, max_new_tokens=150, temperature=T, seed=21))
    results: list = []
    try:
        results += stream.step()  # prefill and the first tokens under A
        engine.load_weights(new, version=v0 + 1)  # sequences in flight
        assert engine._cache_stale  # their KV blocks kept the prefix cache from being reset
        _drain(stream, results)
        stream.step()  # idle: the stale prefix cache is reset now
        assert not engine._cache_stale
    finally:
        engine.load_weights(base_state, version=v0 + 2)
    (res,) = [f.result for f in results]
    assert res.version == v0  # the oldest token's
    model_a, model_b = load_model("tiny"), load_model("tiny")
    model_a.load_state_dict(base_state)
    model_b.load_state_dict(new)
    p, crossed = PROMPTS[0], 0
    for c in res.completions:
        y, vers = c.token_ids, c.token_versions
        m = vers.count(v0)
        assert vers == [v0] * m + [v0 + 1] * (len(y) - m) and m >= 1
        if len(y) <= m:
            continue
        crossed += 1
        with torch.no_grad():
            out = model_a(torch.tensor([p + y[: m - 1]]), use_cache=True)
            lp_a = torch.log_softmax(out.logits[0, len(p) - 1:].float() / T, -1).gather(-1, torch.tensor(y[:m])[:, None])
            out_b = model_b(torch.tensor([y[m - 1: -1]]), past_key_values=out.past_key_values, use_cache=True)
            lp_b = torch.log_softmax(out_b.logits[0].float() / T, -1).gather(-1, torch.tensor(y[m:])[:, None])
            ref = torch.cat([lp_a, lp_b]).squeeze(-1)
            all_b = model_b(torch.tensor([p + y[:-1]])).logits[0, len(p) - 1:].float() / T
            lp_all_b = torch.log_softmax(all_b, -1).gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
        got = torch.tensor(c.logprobs)
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
        assert float((got[m:] - lp_all_b[m:]).abs().max()) > 1e-3  # the check can fail
    assert crossed >= 2


def test_abort_bad_requests_and_no_generate_while_streaming(engine):
    stream = engine.start_stream()
    stream.add("a", PROMPTS[0], SamplingParams(n=2, max_new_tokens=50, seed=1))
    stream.step()
    stream.add("b", PROMPTS[1], SamplingParams(n=2, max_new_tokens=50, seed=1))
    with pytest.raises(RuntimeError, match="stream has groups in flight"):
        engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=2))
    assert sorted(stream.abort()) == ["a", "b"] and stream.groups == 0 and stream.rows == 0
    assert stream.step() == []
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        stream.add("c", [], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream.add("c", [1, engine.vocab_size], SamplingParams())
    assert stream.groups == 0
    stream.add("d", PROMPTS[2], SamplingParams(n=1, max_new_tokens=3, seed=4))
    done: list = []
    _drain(stream, done)
    assert [f.key for f in done] == ["d"] and 1 <= len(done[0].result.completions[0].token_ids) <= 3
    assert len(engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=2))[0].completions) == 1
