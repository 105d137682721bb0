"""rlrt_core.analysis against hand-computed cases and properties; `rlrt analyze` end to end on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrt_core import analysis as an

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def _lp(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# ------------------------------------------------------------------ log-odds z (App. D, eq. 8)


def test_log_odds_z_hand_computed():
    # E = 4, X = 6, alpha = 0.5
    z = an.log_odds_z({"wait": 3, "so": 1}, {"wait": 1, "so": 3, "thus": 2})
    # wait: delta = ln(3.5/1.5) - ln(1.5/5.5) = 0.8472979 + 1.2992830 = 2.1465809
    #       var   = 1/3.5 + 1/1.5 = 0.9523810  ->  z = 2.1465809 / 0.9759001 = 2.1995907
    assert z["wait"] == pytest.approx(2.1995907, abs=1e-6)
    # so:   delta = ln(1.5/3.5) - ln(3.5/3.5) = -0.8472979; var = 1/1.5 + 1/3.5  ->  z = -0.8682223
    assert z["so"] == pytest.approx(-0.8682223, abs=1e-6)
    # thus (absent from explore, e = 0): delta = ln(0.5/4.5) - ln(2.5/4.5) = ln(0.2) = -1.6094379
    #       var = 1/0.5 + 1/2.5 = 2.4  ->  z = -1.6094379 / 1.5491933 = -1.0388880
    assert z["thus"] == pytest.approx(-1.0388880, abs=1e-6)
    assert set(z) == {"wait", "so", "thus"}


def test_log_odds_z_alpha_and_errors():
    # alpha = 1, E = X = 2: a: delta = ln(3/1) - ln(1/3) = 2 ln 3, var = 1/3 + 1 -> z = 2.1972246 / 1.1547005
    z = an.log_odds_z({"a": 2}, {"a": 0, "b": 2}, alpha=1.0)
    assert z["a"] == pytest.approx(2 * math.log(3) / math.sqrt(4 / 3))
    with pytest.raises(ValueError, match="alpha"):
        an.log_odds_z({"a": 1}, {"a": 1}, alpha=0)
    with pytest.raises(ValueError, match=r"explore_counts\['a'\]"):
        an.log_odds_z({"a": -1}, {"a": 1})
    with pytest.raises(ValueError, match="exploit_counts"):
        an.log_odds_z({"a": 1}, {"a": float("nan")})


@given(st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 50), min_size=1),
       st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 50), min_size=1))
def test_log_odds_z_antisymmetric(e, x):
    z1, z2 = an.log_odds_z(e, x), an.log_odds_z(x, e)
    assert set(z1) == set(z2)
    for v in z1:
        assert math.isfinite(z1[v])
        assert z1[v] == pytest.approx(-z2[v], abs=1e-9)


def test_select_markers_filters_in_order():
    # E = 285, X = 76; z: wait 3.62, conclude -5.38, the 3.15, frac 2.86, x 2.55, another 1.90, so -0.78
    explore = {"wait": 80, "another": 25, "the": 60, "frac": 50, "x": 40, "so": 30}
    exploit = {"wait": 1, "another": 1, "the": 1, "frac": 2, "x": 1, "so": 10, "conclude": 60}
    rows = {r["token"]: r for r in an.select_markers(explore, exploit, min_count=30, z_threshold=3.0,
                                                     stop_words=an.english_stop_words() | an.math_stop_words())}
    assert rows["wait"]["marker"] and rows["wait"]["side"] == "explore"
    assert rows["conclude"]["marker"] and rows["conclude"]["side"] == "exploit"
    assert not rows["another"]["marker"] and not rows["another"]["frequent"]  # 26 < 30
    assert rows["the"]["polarized"] and rows["the"]["stop_word"] and not rows["the"]["marker"]  # NLTK list
    assert rows["frac"]["stop_word"] and not rows["frac"]["marker"]  # maths list
    assert not rows["x"]["word"] and not rows["x"]["marker"]  # 1 character
    assert not rows["so"]["polarized"] and rows["so"]["frequent"]
    assert rows["wait"]["z"] == pytest.approx(3.617998, abs=1e-5)
    assert rows["wait"]["log2_ratio"] == pytest.approx(math.log2(80.5 / 1.5))
    zs = [r["z"] for r in an.select_markers(explore, exploit)]
    assert zs == sorted(zs)


def test_word_tokens_and_stop_lists():
    assert an.is_word_token("wait") and an.is_word_token("a" * 15)
    assert not an.is_word_token("ok") and not an.is_word_token("a" * 16)
    assert not an.is_word_token("café") and not an.is_word_token("x2y") and not an.is_word_token("don't")
    assert an.normalize_token(" Wait") == "wait" and an.normalize_token("\nSo ") == "so"
    eng = an.english_stop_words()
    assert len(eng) == 179 and {"the", "but", "because", "ourselves"} <= eng
    maths = an.math_stop_words()
    assert {"frac", "theta", "seven", "boxed", "denominator"} <= maths
    # discourse markers are what the analysis looks for: never stop words
    assert not ({"wait", "another", "consider", "conclude", "correct", "final", "alternatively", "check"}
                & (maths | eng))


def test_extreme_tokens():
    s = torch.stack([_lp([0.5, 0.3, 0.2]), _lp([0.2, 0.2, 0.6])])
    t = torch.stack([_lp([0.1, 0.3, 0.6]), _lp([0.2, 0.7, 0.1])])
    # pos 0: D_hat = ln5, 0, ln(1/3) -> explore 0, exploit 2; pos 1: 0, ln(2/7), ln 6 -> explore 2, exploit 1
    e, x = an.extreme_tokens(s, t)
    assert e.tolist() == [0, 2] and x.tolist() == [2, 1]
    # a token impossible under both views is never picked, one impossible only under P_T wins
    s2 = torch.tensor([[0.0, -math.inf, math.log(1e-9)]]).log_softmax(-1)
    t2 = torch.tensor([[0.0, -math.inf, -math.inf]])
    e2, x2 = an.extreme_tokens(s2, t2)
    assert e2.tolist() == [2] and x2.tolist() == [0]


# ------------------------------------------------------------------ critical positions (sec. 4.1, Fig. 2)


def test_critical_candidates_hand_computed():
    ps = _lp([0.40, 0.30, 0.15, 0.08, 0.05, 0.02])
    pt = _lp([0.11, 0.32, 0.40, 0.02, 0.06, 0.09])
    # pool 3: union {0, 1, 2}; P_S - P_T = +0.29, -0.02, -0.25
    c = an.critical_candidates(ps, pt, pool=3, n=2)
    assert [e["id"] for e in c["explore"]] == [0]
    assert [e["id"] for e in c["exploit"]] == [2, 1]
    assert c["explore"][0]["p_student"] == pytest.approx(0.40) and c["explore"][0]["p_teacher"] == pytest.approx(0.11)
    assert c["explore"][0]["d_hat"] == pytest.approx(math.log(0.40 / 0.11))
    # pool 4: union {0, 1, 2, 3, 5}; token 4 (-0.01) stays out; 3: +0.06, 5: -0.07
    c = an.critical_candidates(ps, pt, pool=4, n=2)
    assert [e["id"] for e in c["explore"]] == [0, 3]
    assert [e["id"] for e in c["exploit"]] == [2, 5]
    c = an.critical_candidates(ps, pt, pool=100, n=4)  # pool larger than V: the whole vocabulary
    assert [e["id"] for e in c["exploit"]] == [2, 5, 1, 4]
    with pytest.raises(ValueError, match="shape mismatch"):
        an.critical_candidates(ps, pt[:5])
    with pytest.raises(ValueError, match="NaN"):
        an.critical_candidates(ps, torch.full((6,), float("nan")))


def test_top_positions():
    d = torch.tensor([0.1, 0.5, 0.0, 0.5, 0.3])
    assert an.top_positions(d, 3) == [1, 3, 4]
    assert an.top_positions(d, 10) == [1, 3, 4, 0, 2]
    with pytest.raises(ValueError, match=r"\[T\]"):
        an.top_positions(d[None], 1)


# ------------------------------------------------------------------ reflection (sec. 6.2)


def test_difficulty_and_injection_positions():
    assert [an.difficulty(c) for c in range(9)] == ["hard"] * 3 + [None, None] + ["easy"] * 3 + [None]
    with pytest.raises(ValueError, match="8 rollouts"):
        an.difficulty(1, 4)
    d = torch.tensor([0.1, 0.5, 0.0, 0.5, 0.0])
    pos = an.injection_positions(d, random.Random(0))
    assert pos["max_kl"] == 1 and pos["min_kl"] == 2 and 0 <= pos["random"] < 5
    seen = {an.injection_positions(d, random.Random(s))["random"] for s in range(50)}
    assert seen == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="non-empty"):
        an.injection_positions(torch.zeros(0), random.Random(0))


def test_flip_rates():
    recs = [
        {"subset": "hard", "site": "max_kl", "before": 0.0, "after": 1.0},
        {"subset": "hard", "site": "max_kl", "before": 0.0, "after": 0.0},
        {"subset": "hard", "site": "random", "before": 0.0, "after": 0.0},
        {"subset": "hard", "site": "random", "before": 1.0, "after": 0.0},  # right on hard: not measured
        {"subset": "easy", "site": "min_kl", "before": 1.0, "after": 0.0},
        {"subset": "easy", "site": "min_kl", "before": 1.0, "after": 1.0},
        {"subset": "easy", "site": "min_kl", "before": 1.0, "after": 1.0},
    ]
    r = an.flip_rates(recs)
    assert r["flip_to_R"]["max_kl"] == {"rate": 0.5, "flips": 1, "n": 2}
    assert r["flip_to_R"]["random"] == {"rate": 0.0, "flips": 0, "n": 1}
    assert r["flip_to_W"]["min_kl"]["rate"] == pytest.approx(1 / 3) and r["flip_to_W"]["min_kl"]["n"] == 3
    assert math.isnan(r["flip_to_R"]["min_kl"]["rate"]) and r["flip_to_R"]["min_kl"]["n"] == 0
    with pytest.raises(ValueError, match="site"):
        an.flip_rates([{"subset": "hard", "site": "middle", "before": 0, "after": 1}])
    with pytest.raises(ValueError, match="subset"):
        an.flip_rates([{"subset": "medium", "site": "random", "before": 0, "after": 1}])


# ------------------------------------------------------------------ shift (sec. 6.3, Fig. 7)


def test_js_divergence_hand_computed():
    assert float(an.js_divergence(_lp([1.0, 0.0]), _lp([0.0, 1.0]))) == pytest.approx(LN2)
    # P = (1/2, 1/2), Q = (1, 0), M = (3/4, 1/4):
    # KL(P||M) = 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410, KL(Q||M) = ln(4/3) = 0.2876821 -> JS = 0.2157616
    assert float(an.js_divergence(_lp([0.5, 0.5]), _lp([1.0, 0.0]))) == pytest.approx(0.2157616, abs=1e-7)
    batch = an.js_divergence(torch.stack([_lp([0.5, 0.5]), _lp([0.2, 0.8])]),
                             torch.stack([_lp([0.5, 0.5]), _lp([0.2, 0.8])]))
    assert batch.shape == (2,) and batch.tolist() == [0.0, 0.0]
    assert an.js_divergence(torch.zeros(3, 4, dtype=torch.float32), torch.zeros(3, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="shape mismatch"):
        an.js_divergence(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="all -inf"):
        an.js_divergence(torch.full((2,), -math.inf), torch.zeros(2))


_logits = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=200, deadline=None)
@given(_logits, st.data())
def test_js_properties(a, data):
    b = data.draw(st.lists(st.floats(-20, 20, allow_nan=False), min_size=len(a), max_size=len(a)))
    p = torch.tensor(a, dtype=torch.float64).log_softmax(-1)
    q = torch.tensor(b, dtype=torch.float64).log_softmax(-1)
    js_pq, js_qp = float(an.js_divergence(p, q)), float(an.js_divergence(q, p))
    assert js_pq == pytest.approx(js_qp, abs=1e-12)  # symmetric
    assert 0.0 <= js_pq <= LN2 + 1e-12  # bounded by ln 2
    assert float(an.js_divergence(p, p)) == pytest.approx(0.0, abs=1e-12)  # 0 when equal
    tv = float((p.exp() - q.exp()).abs().sum()) / 2
    if tv > 1e-4:  # ... and only then: JS >= TV^2 / 2 (Pinsker on each half), so distinct P, Q give JS > 0
        assert js_pq > 0.0
        assert js_pq >= tv**2 / 2 - 1e-12


def test_topk_overlap_hand_computed():
    p = _lp([0.4, 0.3, 0.2, 0.1])  # ranking 0, 1, 2, 3
    q = _lp([0.3, 0.4, 0.1, 0.2])  # ranking 1, 0, 3, 2
    ov = an.topk_overlap(p, q, ks=[1, 2, 3, 4])
    assert ov.tolist() == pytest.approx([0.0, 1.0, 2 / 3, 1.0])
    both = an.topk_overlap(torch.stack([p, p]), torch.stack([q, p]), ks=[1, 3])
    assert torch.allclose(both, torch.tensor([[0.0, 2 / 3], [1.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="ks"):
        an.topk_overlap(p, q, ks=[5])


def test_ccdf_tail_promotion_and_shift_statistics():
    assert an.ccdf(torch.tensor([0.0, 0.05, 0.2, 0.6]), [0.0, 0.1, 0.5, 1.0]).tolist() == [0.75, 0.5, 0.25, 0.0]
    assert math.isnan(float(an.ccdf(torch.zeros(0), [0.1])[0]))
    assert an.tail_promotion(torch.tensor([0.5, 0.05, 1e-4]), [1e-1, 1e-3, 1e-5]).tolist() == \
        pytest.approx([2 / 3, 1 / 3, 0.0])
    base = torch.stack([_lp([0.7, 0.2, 0.0999, 0.0001]), _lp([0.25, 0.25, 0.25, 0.25])])
    ft = torch.stack([_lp([0.0001, 0.0999, 0.2, 0.7]), _lp([0.25, 0.25, 0.25, 0.25])])
    s = an.shift_statistics(ft, base, ks=[1, 2, 4], thresholds=[1e-1, 1e-3, 1e-5])
    assert s["high"].tolist() == [True, False]
    assert float(s["js"][1]) == 0.0 and float(s["js"][0]) > 0.1
    # position 0: ft ranking 3, 2, 1, 0 vs base 0, 1, 2, 3
    assert s["overlap"].tolist() == [[0.0, 0.0, 1.0]]
    assert s["base_prob_of_new_top1"].tolist() == pytest.approx([1e-4])
    assert s["tail_fraction"].tolist() == [1.0, 1.0, 0.0]


# ------------------------------------------------------------------ `rlrt analyze` end to end (tiny model)


def _analyze(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="120")
    env.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "services.cli.main", "analyze", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def _check_outputs(out: Path, figures: list[str]) -> dict:
    """report.json parses with only finite numbers; each PNG decodes; the HTML inlines each PNG."""
    import matplotlib.image as mpimg

    doc = json.loads((out / "report.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(doc))
    assert doc["figures"] == [f"{f}.png" for f in figures]
    page = (out / "report.html").read_text()
    for f in figures:
        raw = (out / f"{f}.png").read_bytes()
        img = mpimg.imread(io.BytesIO(raw), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert float(img[..., :3].std()) > 0.01  # not a blank canvas
        assert base64.b64encode(raw).decode() in page
    assert doc["seconds"] > 0
    return doc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as the learner leaves it: config.yaml naming `tiny`, one checkpoint of perturbed weights."""
    import yaml

    from rlrt_core.checkpoint import save_checkpoint
    from rlrt_core.models import load_model

    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "tiny", "dtype": "float32"}}))
    model = load_model("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_checkpoint(run / "checkpoints", step=4, version=4, model=model)
    return run


@pytest.mark.slow
def test_analyze_heatmap_tiny(tmp_path):
    out = tmp_path / "heat"
    p = _analyze("heatmap", "--model", "tiny", "--num-problems", "2", "--samples", "2", "--rollouts", "2",
                 "--critical", "2", "--max-new-tokens", "10", "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = _check_outputs(out, ["heatmap", "candidates", "dbar_hist"])
    assert len(doc["rollouts"]) == 2
    for r in doc["rollouts"]:
        assert r["d_bar_method"] == "full_vocabulary"
        assert len(r["d_bar"]) == len(r["tokens"]) == len(r["token_ids"]) == len(r["d_hat"])
        assert all(v >= 0 for v in r["d_bar"]) and max(r["d_bar"]) > 0
        assert [c["position"] for c in r["critical"]] == sorted(range(len(r["d_bar"])), key=lambda t: -r["d_bar"][t])[:2]
        for c in r["critical"]:
            assert 1 <= len(c["explore"]) <= 4 and 1 <= len(c["exploit"]) <= 4
            assert all(e["p_student"] > e["p_teacher"] for e in c["explore"])
            assert all(e["p_teacher"] > e["p_student"] for e in c["exploit"])
    assert doc["summary"]["d_bar_max"] == pytest.approx(max(max(r["d_bar"]) for r in doc["rollouts"]))
    # rows over the memory budget take the top-k estimate of D̄_t (its accuracy is tested in
    # test_theory.py; the tiny model's near-uniform rows are its worst case, so only the wiring here)
    out2 = tmp_path / "heat-topk"
    p = _analyze("heatmap", "--model", "tiny", "--num-problems", "2", "--samples", "2", "--rollouts", "2",
                 "--critical", "2", "--max-new-tokens", "10", "--full-vocab-max-mb", "0", "--topk", "50",
                 "--out", str(out2))
    assert p.returncode == 0, p.stderr
    doc2 = _check_outputs(out2, ["heatmap", "candidates", "dbar_hist"])
    for a, b in zip(doc["rollouts"], doc2["rollouts"]):
        assert b["d_bar_method"] == "top50_estimate" and a["token_ids"] == b["token_ids"]
        assert b["d_hat"] == pytest.approx(a["d_hat"], abs=1e-5)  # sampled-token D̂_t is exact either way
        assert all(v >= 0 for v in b["d_bar"]) and b["d_bar"] != a["d_bar"]
        assert [c["position"] for c in b["critical"]] == sorted(range(len(b["d_bar"])), key=lambda t: -b["d_bar"][t])[:2]
    assert "D̄_t computed by top50_estimate" in (out2 / "report.html").read_text()


@pytest.mark.slow
def test_analyze_markers_tiny(tmp_path):
    out = tmp_path / "markers"
    p = _analyze("markers", "--model", "tiny", "--num-problems", "3", "--samples", "2", "--any-outcome",
                 "--min-count", "2", "--z", "0.5", "--max-new-tokens", "10", "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = _check_outputs(out, ["markers"])
    assert doc["trajectories"] == 6 and doc["positions"] > 0
    tokens = doc["tokens"]
    # every position adds one token to each corpus
    assert sum(t["explore"] for t in tokens) == sum(t["exploit"] for t in tokens) == doc["positions"]
    for t in doc["markers"]:
        assert t["word"] and t["frequent"] and t["polarized"] and not t["stop_word"]
        assert abs(t["z"]) >= 0.5 and t["explore"] + t["exploit"] >= 2
    # the paper's selection refuses a model that never answers correctly, with a clear message
    p = _analyze("markers", "--model", "tiny", "--num-problems", "2", "--samples", "2", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "none"))
    assert p.returncode == 2 and "both a correct and an incorrect rollout" in p.stderr


@pytest.mark.slow
def test_analyze_reflection_tiny(tmp_path, tiny_run):
    out = tmp_path / "refl"
    p = _analyze("reflection", "--checkpoints", str(tiny_run), "--num-problems", "2", "--max-rollouts", "2",
                 "--max-new-tokens", "8", "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = _check_outputs(out, ["reflection"])
    assert [m["step"] for m in doc["models"]] == [0, 4]
    for m in doc["models"]:
        assert sum(m["subsets"].values()) == 2
        n_inj = sum(m["injected_rollouts"].values())
        assert len(m["records"]) == 3 * n_inj
        for kind in ("flip_to_R", "flip_to_W"):
            for site in ("max_kl", "random", "min_kl"):
                r = m["rates"][kind][site]
                assert (r["rate"] is None) == (r["n"] == 0)
                if r["n"]:
                    assert r["rate"] == pytest.approx(r["flips"] / r["n"])
        for rec in m["records"]:
            assert "Wait, let me reconsider." in rec["continued"]
    p = _analyze("reflection", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "exactly one of --checkpoints" in p.stderr


@pytest.mark.slow
def test_analyze_shift_tiny(tmp_path, tiny_run):
    out = tmp_path / "shift"
    ckpt = tiny_run / "checkpoints" / "step_000004"
    p = _analyze("shift", "--base", "tiny", "--ft", str(ckpt), "--num-problems", "2", "--hard-prompts", "2",
                 "--ft-rollouts", "2", "--js-high", "0.005", "--max-new-tokens", "10", "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = _check_outputs(out, ["shift"])
    s = doc["summary"]
    assert s["positions"] == len(doc["js_per_position"]) > 0
    assert all(0 <= v <= LN2 for v in doc["js_per_position"])
    assert s["high_divergence"] == sum(v > 0.005 for v in doc["js_per_position"]) > 0
    ccdf = doc["ccdf"]["fraction"]
    assert all(a >= b for a, b in zip(ccdf, ccdf[1:]))  # a CCDF never increases
    assert all(0 <= v <= 1 for v in doc["topk_overlap"]["mean"])
    tail = doc["tail_promotion"]["fraction"]
    assert all(a >= b for a, b in zip(tail, tail[1:]))
    # the same weights on both sides: no shift at all
    p = _analyze("shift", "--base", "tiny", "--ft", "tiny", "--num-problems", "1", "--hard-prompts", "1",
                 "--max-new-tokens", "6", "--out", str(tmp_path / "same"))
    assert p.returncode == 0, p.stderr
    same = json.loads((tmp_path / "same" / "report.json").read_text())
    assert max(same["js_per_position"]) < 1e-6 and same["summary"]["high_divergence"] == 0


def test_analyze_bad_inputs(tmp_path):
    p = _analyze("heatmap", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "--model" in p.stderr and "nope" in p.stderr
    p = _analyze("heatmap", "--model", "tiny", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "--data" in p.stderr and "not found" in p.stderr
