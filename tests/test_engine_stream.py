"""Continuous batching (`TorchEngine.start_stream()`) against the batch engine, on the tiny model:
same seeds give the same completions, freed rows are refilled between decode steps, groups
finish independently, and a weight update in flight keeps every behaviour log-prob exact."""

from __future__ import annotations

import pytest
import torch

from rlrt_core.config import build_config
from rlrt_core.engines import SamplingParams, TorchEngine, make_engine
from rlrt_core.models import load_model

MAX_LEN = 256
PROMPTS = [[1, 9690, 198, 2683, 359], [1, 4093, 198, 1780, 314, 216, 34, 27, 35], [7018, 411],
           [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_engines.py: tiny matrices, loaded machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    cfg = build_config({"model": {"path": "tiny", "max_model_len": MAX_LEN}}, use_env=False)
    return make_engine(cfg)


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model("tiny").state_dict().items()}


def _run(stream, adds: dict[int, list[tuple]]) -> tuple[dict, list[tuple[int, list]]]:
    """Step until empty; adds[step] = [(key, prompt, sampling)] are added before that step.
    -> (key -> GenerationResult, [(step, keys finished at it)])."""
    done, order, step = {}, [], 0
    while stream.groups or any(s >= step for s in adds):
        for key, p, sp in adds.get(step, []):
            stream.add(key, p, sp)
        fin = stream.step()
        for f in fin:
            done[f.key] = f.result
        if fin:
            order.append((step, [f.key for f in fin]))
        step += 1
    return done, order


def test_stream_gives_generates_completions_per_group(engine):
    sps = [SamplingParams(n=4, max_new_tokens=30, seed=100 + i, temperature=t)
           for i, t in enumerate([1.0, 0.7, 1.0, 1.3])]
    stream = engine.start_stream()
    # groups join a running batch at different steps, with different prompt lengths
    done, _ = _run(stream, {0: [(0, PROMPTS[0], sps[0]), (1, PROMPTS[1], sps[1])], 3: [(2, PROMPTS[2], sps[2])],
                            7: [(3, PROMPTS[3], sps[3])]})
    assert sorted(done) == [0, 1, 2, 3] and stream.groups == 0 and stream.rows == 0
    for k, p in enumerate(PROMPTS):
        ref = engine.generate([p], sps[k])[0]
        got = done[k]
        assert got.prompt_ids == p and got.version == engine.version
        assert [c.token_ids for c in got.completions] == [c.token_ids for c in ref.completions]
        assert [c.finish_reason for c in got.completions] == [c.finish_reason for c in ref.completions]
        for c, r in zip(got.completions, ref.completions):
            assert c.text == r.text
            assert c.token_versions == [engine.version] * len(c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    # the groups' completions differ from each other (their seeds do)
    assert len({tuple(c.token_ids) for r in done.values() for c in r.completions}) > 8


def test_slots_are_refilled_and_groups_finish_independently(engine):
    stream = engine.start_stream()
    stream.add("long", PROMPTS[1], SamplingParams(n=2, max_new_tokens=40, seed=2))  # rows of 40 tokens
    stream.add("short", PROMPTS[0], SamplingParams(n=3, max_new_tokens=2, seed=1))
    assert stream.groups == 2 and stream.rows == 5  # queued until the next step; their rows count for admission
    added = {"long": 0, "short": 0}
    finished, rows, widths = {}, [], []
    step = 0
    while stream.groups:
        if step == 3:  # a slot freed by the short group is refilled while "long" keeps decoding
            stream.add("refill", PROMPTS[3], SamplingParams(n=4, max_new_tokens=5, seed=3))
            added["refill"] = step
        for f in stream.step():
            finished[f.key] = (step, f.result)
        rows.append(stream.rows)
        widths.append(stream.cache_width)
        step += 1
    assert sorted(finished) == ["long", "refill", "short"]
    for key, (at, res) in finished.items():
        # each group ends exactly when its own longest row does, whatever its batch-mates do
        assert at == added[key] + max(len(c.token_ids) for c in res.completions) - 1, key
    assert max(len(c.token_ids) for c in finished["long"][1].completions) == 40
    assert finished["short"][0] < finished["refill"][0] < finished["long"][0] == 39
    assert rows[0] == 5 and rows[3] >= 2 + 1 and rows[-1] == 0  # the refill's rows joined at step 3
    # a decode step attends over the longest live row's tokens plus its pending one, never more:
    # while "long" decodes alone (after the refill ended) that is exactly its own length
    after_refill = range(finished["refill"][0] + 1, finished["long"][0])
    assert all(widths[s] == len(PROMPTS[1]) + s + 1 for s in after_refill)
    assert widths[-1] == 0


def test_inflight_weight_update_keeps_behaviour_logprobs_exact(engine, base_state):
    """A sequence that crossed an update: its first tokens were sampled under version A, the rest
    under B, whose forward passes attend to A's KV cache of the earlier tokens. Recomputing each
    token with the right version (prefix with A, the rest with B on top of A's cache) reproduces
    the behaviour log-probs exactly; recomputing everything with B does not."""
    T, switch_after = 0.9, 6
    v0 = engine.version
    g = torch.Generator().manual_seed(9)
    new = {k: v + torch.randn(v.shape, generator=g) * 0.05 for k, v in base_state.items() if k != "lm_head.weight"}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied in this model
    stream = engine.start_stream()
    stream.add("g", PROMPTS[0], SamplingParams(n=4, max_new_tokens=20, temperature=T, seed=21))
    results = []
    try:
        for _ in range(switch_after):
            results += stream.step()
        engine.load_weights(new, version=v0 + 1)  # between decode steps, rows in flight
        while stream.groups:
            results += stream.step()
    finally:
        engine.load_weights(base_state, version=v0 + 2)
    (res,) = [f.result for f in results]
    assert res.version == v0  # the oldest token's
    crossed = 0
    model_a, model_b = load_model("tiny"), load_model("tiny")
    model_a.load_state_dict(base_state)
    model_b.load_state_dict(new)
    p = PROMPTS[0]
    for c in res.completions:
        y, m = c.token_ids, min(switch_after, len(c.token_ids))
        assert c.token_versions == [v0] * m + [v0 + 1] * (len(y) - m)
        if len(y) <= m:
            continue
        crossed += 1
        with torch.no_grad():
            # version A: prompt + y[:m-1] (the cache the engine held), logits for y[0..m-1]
            out = model_a(torch.tensor([p + y[: m - 1]]), use_cache=True)
            lp_a = torch.log_softmax(out.logits[0, len(p) - 1:].float() / T, -1).gather(-1, torch.tensor(y[:m])[:, None])
            # version B on top of A's cache: y[m-1] onwards, logits for y[m..]
            out_b = model_b(torch.tensor([y[m - 1: -1]]), past_key_values=out.past_key_values, use_cache=True)
            lp_b = torch.log_softmax(out_b.logits[0].float() / T, -1).gather(-1, torch.tensor(y[m:])[:, None])
            ref = torch.cat([lp_a, lp_b]).squeeze(-1)
            all_b = model_b(torch.tensor([p + y[:-1]])).logits[0, len(p) - 1:].float() / T
            lp_all_b = torch.log_softmax(all_b, -1).gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
        got = torch.tensor(c.logprobs)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        # the check can fail: B's own recomputation of the same tokens differs beyond the tolerance
        assert float((got[m:] - lp_all_b[m:]).abs().max()) > 1e-3
    assert crossed >= 2


def test_abort_and_bad_requests(engine):
    stream = engine.start_stream()
    stream.add("a", PROMPTS[0], SamplingParams(n=2, max_new_tokens=50, seed=1))
    stream.step()
    stream.add("b", PROMPTS[1], SamplingParams(n=2, max_new_tokens=50, seed=1))
    assert sorted(stream.abort()) == ["a", "b"] and stream.groups == 0 and stream.rows == 0
    assert stream.step() == []
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        stream.add("c", [], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream.add("c", [1, engine.vocab_size], SamplingParams())
    assert stream.groups == 0
    # still usable after an abort
    stream.add("d", PROMPTS[2], SamplingParams(n=1, max_new_tokens=3, seed=4))
    done, _ = _run(stream, {})
    assert list(done) == ["d"] and 1 <= len(done["d"].completions[0].token_ids) <= 3


def test_row_budget_admits_a_group_while_earlier_groups_wait_for_their_slowest_sample(engine):
    """The rollout worker's admission rule: a budget of G x K rows, a new group admitted as soon
    as K rows are free. Samples that ended free their rows while their group waits for its slowest
    one, so a third group joins while both earlier groups are still in flight (a group budget of
    G = 2 would have waited), and every group still yields generate([prompt], seed)'s completions."""
    K, budget = 4, 8
    sps = [SamplingParams(n=K, max_new_tokens=40, seed=200 + i) for i in range(len(PROMPTS))]
    todo = list(range(len(PROMPTS)))
    stream = engine.start_stream()
    done, inflight, early, rows = {}, set(), [], []
    while todo or inflight:
        while todo and stream.rows + K <= budget:
            k = todo.pop(0)
            if len(inflight) >= budget // K:  # more groups than a group budget allows
                early.append((k, sorted(inflight)))
            stream.add(k, PROMPTS[k], sps[k])
            inflight.add(k)
        rows.append(stream.rows)
        for f in stream.step():
            done[f.key] = f.result
            inflight.discard(f.key)
    assert sorted(done) == list(range(len(PROMPTS))) and stream.rows == 0
    assert max(rows) <= budget
    assert early, "no group was admitted before the earlier groups finished"
    for k, p in enumerate(PROMPTS):
        ref = engine.generate([p], sps[k])[0]
        assert [c.token_ids for c in done[k].completions] == [c.token_ids for c in ref.completions], k
        for c, r in zip(done[k].completions, ref.completions):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    # rows of a finished sample were reused: the groups' samples differ in length within a group
    assert any(len({len(c.token_ids) for c in r.completions}) > 1 for r in done.values())
