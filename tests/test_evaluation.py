"""avg@k and the unbiased pass@k estimator (Chen et al., 2021), and `rlrt eval` end to end."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from rlrt_core.data import arithmetic_problems, load_jsonl, resolve_data_path
from rlrt_core.evaluation import avg_at_k, default_pass_ks, evaluate, parse_ks, pass_at_k, pass_at_k_curve
from rlrt_core.reward import Verifier, math_reward

REPO = Path(__file__).resolve().parents[1]


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_exact_binomials():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(256, 1, 1), (256, 1, 128), (256, 3, 17), (256, 200, 40), (1024, 5, 512),
                                     (256, 0, 256), (256, 256, 1), (100, 1, 100)])
def test_pass_at_k_stable_for_large_n(n, c, k):
    # C(256, 128) ~ 1e75: the running product keeps full double precision
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_is_unbiased():
    # the estimator is the exact fraction of k-subsets of the n samples that hold a correct one
    samples = [1, 0, 0, 1, 0, 0, 0, 0]
    for k in range(1, len(samples) + 1):
        subsets = list(itertools.combinations(samples, k))
        hit = sum(1 for s in subsets if any(s)) / len(subsets)
        assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(hit, abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"k=17 must lie in \[1, n=16\]"):
        pass_at_k(16, 3, 17)
    with pytest.raises(ValueError, match=r"c=17"):
        pass_at_k(16, 17, 1)
    with pytest.raises(ValueError, match="n >= 1"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(4, 1, 0)


def test_avg_at_k_and_curve():
    rewards = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert avg_at_k(rewards) == pytest.approx((0.25 + 1 + 0) / 3)
    # problems weigh equally even with different sample counts
    assert avg_at_k([[1.0], [0.0, 0.0, 0.0]]) == pytest.approx(0.5)
    curve = pass_at_k_curve([(4, 1), (4, 4), (4, 0)], [1, 2, 4])
    assert curve[1] == pytest.approx(avg_at_k(rewards))
    assert curve[2] == pytest.approx((0.5 + 1 + 0) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    assert list(curve) == [1, 2, 4]
    for bad in ([], [[]]):
        with pytest.raises(ValueError):
            avg_at_k(bad)
    with pytest.raises(ValueError, match="no problems"):
        pass_at_k_curve([], [1])


def test_k_lists():
    assert default_pass_ks(16) == [1, 2, 4, 8, 16]
    assert default_pass_ks(12) == [1, 2, 4, 8, 12]
    assert default_pass_ks(1) == [1]
    assert default_pass_ks(256)[-1] == 256 and len(default_pass_ks(256)) == 9
    assert parse_ks("4, 1,2,2", 8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"k values \[32, 64\] outside \[1, 16\]"):
        parse_ks("1,32,64", 16)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ks("1,two", 16)
    with pytest.raises(ValueError, match="no k values"):
        parse_ks(",", 16)


# --------------------------------------------------------------------------- with a real engine

@pytest.fixture(scope="module")
def tiny_engine():
    from rlrt_core.engines import TorchEngine

    eng = TorchEngine("tiny")
    yield eng
    eng.close()


def test_evaluate_with_tiny_engine(tiny_engine):
    problems = (arithmetic_problems(digits=1, ops=["+"], num_problems=2, seed=0, instruction="Reply with a number.")
                + load_jsonl(resolve_data_path("gsm8k-test"), max_problems=1))
    seen = []
    with Verifier(mode="last_number", timeout_s=10, workers=1) as v:
        kw = dict(k=4, pass_ks=[1, 2, 4], max_new_tokens=8, seed=5, batch_size=3, keep_texts=True,
                  dataset="mix", on_progress=seen.append)
        rep = evaluate(tiny_engine, problems, v, **kw)
        again = evaluate(tiny_engine, problems, v, **kw)
        other = evaluate(tiny_engine, problems, v, **{**kw, "seed": 6})
        with pytest.raises(ValueError, match="outside"):
            evaluate(tiny_engine, problems[:1], v, k=2, pass_ks=[4])
    assert seen[:1] == [3]
    assert rep.num_problems == 3 and rep.k == 4 and list(rep.pass_at_k) == [1, 2, 4]
    assert sum(rep.outcomes.values()) == 12
    for p, r in zip(problems, rep.problems):
        assert r.id == p.id and r.n == 4 and len(r.texts) == 4
        # every reward is what the verifier gives the completion text on its own
        assert r.rewards == [math_reward(t, p.answer, mode="last_number") for t in r.texts]
        assert r.correct == sum(r.rewards)
    assert rep.avg_at_k == pytest.approx(rep.pass_at_k[1])
    assert rep.pass_at_k[1] <= rep.pass_at_k[2] <= rep.pass_at_k[4]
    assert [r.texts for r in again.problems] == [r.texts for r in rep.problems]  # seeded: reproducible
    assert [r.texts for r in other.problems] != [r.texts for r in rep.problems]
    assert json.loads(json.dumps(rep.to_dict()))["pass_at_k"]["4"] == rep.pass_at_k[4]


@pytest.mark.slow
def test_rlrt_eval_cli_tiny(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "services.cli.main", "eval", "--model", "tiny", "--data", "arithmetic:1:+-",
           "--data", "gsm8k-test", "-k", "2", "--pass-at", "1,2", "--max-new-tokens", "6", "--limit", "2",
           "--mode", "last_number", "--workers", "1", "--json", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["k"] == 2 and doc["pass_at"] == [1, 2] and doc["engine"] == "torch"
    assert [d["dataset"] for d in doc["datasets"]] == ["arithmetic-1d-+-", "gsm8k-test"]
    for d in doc["datasets"]:
        assert d["num_problems"] == 2 and set(d["pass_at_k"]) == {"1", "2"}
        assert 0.0 <= d["avg_at_k"] <= d["pass_at_k"]["2"] <= 1.0
        assert [p["n"] for p in d["problems"]] == [2, 2]
    assert "pass@2" in p.stdout and "gsm8k-test" in p.stdout
    bad = subprocess.run(cmd[:-2] + ["--pass-at", "1,4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--pass-at" in bad.stderr and "[4]" in bad.stderr


def test_eval_dataset_specs():
    from rlrt_core.config import DataConfig
    from services.cli.eval_cmd import _load_dataset

    cfg = DataConfig(instruction="Think, then answer.")
    name, probs = _load_dataset("arithmetic:2:+-", data_cfg=cfg, instruction=None, from_recipe=False, limit=5)
    assert name == "arithmetic-2d-+-" and len(probs) == 5
    assert all(p.prompt.endswith("Think, then answer.") for p in probs)
    name, probs = _load_dataset("gsm8k-test", data_cfg=cfg, instruction=None, from_recipe=False, limit=2)
    assert name == "gsm8k-test" and not probs[0].prompt.endswith("Think, then answer.")
    _, probs = _load_dataset("gsm8k-test", data_cfg=cfg, instruction=None, from_recipe=True, limit=2)
    assert probs[0].prompt.endswith("\n\nThink, then answer.")
    _, probs = _load_dataset("arithmetic", data_cfg=cfg, instruction="", from_recipe=True, limit=1)
    assert probs[0].prompt.endswith("?")
    with pytest.raises(ValueError, match="digits must be an integer"):
        _load_dataset("arithmetic:two", data_cfg=cfg, instruction=None, from_recipe=False, limit=1)
    with pytest.raises(ValueError, match="ops must be"):
        _load_dataset("arithmetic:1:/", data_cfg=cfg, instruction=None, from_recipe=False, limit=1)
