"""Run samples (`rlrt_core.samples`): what the learner records every `metrics.sample_every`
steps, the bounds on it, atomic writes, and the explorer's JSON routes over it (served by a
real admin server, as the learner mounts them)."""

from __future__ import annotations

import json
import math
import re
from array import array
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from rlrt_core import samples as sm
from rlrt_core.config import build_config
from rlrt_core.learner import TrainGroup, TrainSample
from rlrt_core.models import load_tokenizer
from services.common.admin import AdminServer, ServiceState
from services.common.explore import explore_router
from tests.test_learner_loop import Harness, _cfg


def _group(gid: str, version: int, rewards: list[float], n_tokens: int, *, scored: bool = True) -> TrainGroup:
    out = []
    for k, r in enumerate(rewards):
        ids = [10 + k * 10 + t for t in range(n_tokens)]
        s = [-1.0 - 0.1 * t for t in range(n_tokens)] if scored else None
        tt = [-2.0 + 0.05 * t * k for t in range(n_tokens)] if scored else None
        out.append(TrainSample(prompt_ids=[1, 2], response_ids=ids, behavior_logprobs=[-1.0] * n_tokens, reward=r,
                               student_logprobs=s, teacher_logprobs=tt))
    return TrainGroup(group_id=gid, version=version, samples=out)


def _source(g: TrainGroup, prompt: str) -> sm.SampleSource:
    return sm.SampleSource(prompt=prompt, problem_id="p-" + g.group_id,
                           d_bar_topk=[array("f", [0.25 * (t + 1) for t in range(len(s.response_ids))])
                                       for s in g.samples],
                           finish_reasons=["length"] * len(g.samples), context_kinds=["solution"] * len(g.samples))


def _decode(ids: list[int]) -> list[str]:
    return [f"<{i}>" for i in ids]


def test_sample_values_bounds_and_batch_histograms():
    g1 = _group("g1", 3, [1.0, 0.0, 0.0], 4)
    g2 = _group("g2", 2, [0.0, 1.0, 1.0], 3)
    g3 = _group("g3", 3, [0.0, 0.0, 0.0], 2, scored=False)  # no teacher scores at all
    sources = {"g1": _source(g1, "1+1?"), "g2": _source(g2, "2+2?")}
    doc = sm.build_step_sample(7, 8, "rlrt", [g1, g2, g3], sources, max_rollouts=4, decode=_decode, topk=8)
    assert (doc["step"], doc["version"], doc["method"], doc["groups"], doc["rollouts_total"]) == (7, 8, "rlrt", 3, 9)
    assert doc["topk"] == 8
    # whole groups in batch order, the last one cut at the bound
    assert [(r["group_id"], r["index"]) for r in doc["rollouts"]] == [("g1", 0), ("g1", 1), ("g1", 2), ("g2", 0)]
    # groups the teacher scored come first
    doc2 = sm.build_step_sample(7, 8, "rlrt", [g3, g1], sources, max_rollouts=4)
    assert [r["group_id"] for r in doc2["rollouts"]] == ["g1", "g1", "g1", "g3"]
    r = doc["rollouts"][1]
    s = g1.samples[1]
    assert r["token_ids"] == s.response_ids and r["tokens"] == [f"<{i}>" for i in s.response_ids]
    assert r["d_hat"] == [a - b for a, b in zip(s.student_logprobs, s.teacher_logprobs)]
    assert r["d_bar_topk"] == [0.25, 0.5, 0.75, 1.0]
    assert (r["reward"], r["version"], r["prompt"], r["problem_id"], r["finish_reason"], r["context"]) == \
        (0.0, 3, "1+1?", "p-g1", "length", "solution")
    assert doc["rollouts"][3]["version"] == 2 and doc["rollouts"][3]["prompt"] == "2+2?"
    # histograms cover every token of the batch that has the value, not only the sampled rollouts
    h = doc["histograms"]["d_hat"]
    assert h["n"] == 3 * 4 + 3 * 3 and sum(h["counts"]) == h["n"] and len(h["edges"]) == sm.HIST_BINS + 1
    every_hat = [a - b for g in (g1, g2) for s in g.samples for a, b in zip(s.student_logprobs, s.teacher_logprobs)]
    assert h["min"] == min(every_hat) and h["max"] == max(every_hat)
    assert h["mean"] == pytest.approx(sum(every_hat) / len(every_hat))
    assert h["scale"] == pytest.approx(float(np.quantile(np.abs(every_hat), 0.95)))
    hb = doc["histograms"]["d_bar_topk"]
    assert hb["n"] == 21 and hb["min"] == 0.25 and hb["max"] == 1.0
    assert set(doc["values"]) == {"d_hat", "d_bar_topk"} and "top-k" in doc["values"]["d_bar_topk"]
    sm.validate_step(json.loads(json.dumps(doc, allow_nan=False)))


def test_values_are_absent_where_the_teacher_did_not_score_and_non_finite_become_null():
    g = _group("g", 0, [0.0, 0.0], 2, scored=False)
    doc = sm.build_step_sample(1, 1, "grpo", [g], {}, max_rollouts=8)
    assert doc["histograms"] == {} and doc["values"] == {}
    for r in doc["rollouts"]:
        assert "d_hat" not in r and "d_bar_topk" not in r and "tokens" not in r and r["prompt"] is None
    g = _group("h", 0, [1.0], 2)
    g.samples[0].teacher_logprobs = [float("-inf"), -1.0]
    doc = sm.build_step_sample(1, 1, "rlrt", [g], {}, max_rollouts=8)
    assert doc["rollouts"][0]["d_hat"][0] is None and doc["rollouts"][0]["d_hat"][1] == (-1.0 - 0.1) - (-1.0)
    assert doc["histograms"]["d_hat"]["n"] == 1
    json.dumps(doc, allow_nan=False)


def test_writer_honours_sample_every_keep_and_drop_after(tmp_path):
    assert [s for s in range(1, 11) if sm.SampleWriter(tmp_path, every=3, max_rollouts=1, keep=5).due(s)] == [3, 6, 9]
    assert not any(sm.SampleWriter(tmp_path, every=0, max_rollouts=1, keep=5).due(s) for s in range(10))
    w = sm.SampleWriter(tmp_path, every=1, max_rollouts=2, keep=3)
    g = _group("g", 0, [1.0, 0.0], 2)
    for step in range(1, 7):
        w.write(sm.build_step_sample(step, step, "rlrt", [g], {}, max_rollouts=w.max_rollouts))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == \
        ["step_000004.json", "step_000005.json", "step_000006.json"]
    assert w.drop_after(4) == 2
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000004.json"]
    with pytest.raises(ValueError, match="keep"):
        sm.SampleWriter(tmp_path, every=1, max_rollouts=1, keep=0)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    w = sm.SampleWriter(tmp_path, every=1, max_rollouts=2, keep=3)
    g = _group("g", 0, [1.0, 0.0], 2)
    w.write(sm.build_step_sample(2, 2, "rlrt", [g], {}, max_rollouts=2))
    before = sm.sample_path(tmp_path, 2).read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sm.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        w.write(sm.build_step_sample(2, 99, "rlrt", [g], {}, max_rollouts=2))
    assert sm.sample_path(tmp_path, 2).read_bytes() == before
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_000002.json"]
    # a doc that is not valid JSON (NaN) is refused before anything is written
    monkeypatch.undo()
    bad = sm.build_step_sample(3, 3, "rlrt", [g], {}, max_rollouts=2)
    bad["histograms"]["d_hat"]["mean"] = math.nan
    with pytest.raises(ValueError):
        w.write(bad)
    assert not sm.sample_path(tmp_path, 3).exists()


def _write_bad_files(samples_dir: Path) -> dict[str, str]:
    good = sm.build_step_sample(5, 5, "rlrt", [_group("g", 0, [1.0], 3)], {}, max_rollouts=1)
    cases = {"step_000001.json": "{not json",
             "step_000002.json": json.dumps({**good, "step": 2, "format": 99}),
             "step_000003.json": json.dumps({**good, "step": 3,
                                             "rollouts": [{**good["rollouts"][0], "tokens": ["a"]}]}),
             "step_000004.json": json.dumps(good)}  # holds step 5
    samples_dir.mkdir(parents=True, exist_ok=True)
    for name, text in cases.items():
        (samples_dir / name).write_text(text)
    (samples_dir / "step_000005.json").write_text(json.dumps(good))
    return cases


def test_reader_skips_and_reports_malformed_files(tmp_path):
    _write_bad_files(tmp_path / "samples")
    good, bad = sm.list_steps(tmp_path)
    assert [s["step"] for s in good] == [5] and good[0]["rollouts"] == 1 and good[0]["reward_mean"] == 1.0
    reasons = {b["file"]: b["reason"] for b in bad}
    assert sorted(reasons) == ["step_000001.json", "step_000002.json", "step_000003.json", "step_000004.json"]
    assert "unreadable" in reasons["step_000001.json"] and "format 99" in reasons["step_000002.json"]
    assert "tokens" in reasons["step_000003.json"] and "holds step 5" in reasons["step_000004.json"]
    with pytest.raises(sm.SampleNotFound):
        sm.read_step(tmp_path / "samples", 9)
    with pytest.raises(sm.SampleError, match="tokens"):
        sm.read_step(tmp_path / "samples", 3)


def test_explore_routes_on_an_admin_server(tmp_path):
    """The routes as the learner mounts them: a real admin server, real HTTP."""
    _write_bad_files(tmp_path / "samples")
    state = ServiceState(service="learner", run="r", worker="w", registry=CollectorRegistry(),
                         routers=[explore_router(tmp_path)])
    server = AdminServer(state)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}/explore"
        page = httpx.get(base)
        assert page.status_code == 200 and "<script>" in page.text
        assert not re.search(r"<script[^>]+src=|<link |@import|url\(", page.text)  # self-contained
        listing = httpx.get(f"{base}/api/steps").json()
        assert [s["step"] for s in listing["steps"]] == [5] and len(listing["skipped"]) == 4
        r = httpx.get(f"{base}/api/steps/5")
        assert r.status_code == 200 and r.json()["rollouts"][0]["d_hat"] == \
            json.loads((tmp_path / "samples" / "step_000005.json").read_text())["rollouts"][0]["d_hat"]
        r = httpx.get(f"{base}/api/steps/7")
        assert r.status_code == 404 and "no sample for step 7" in r.json()["detail"]
        r = httpx.get(f"{base}/api/steps/1")
        assert r.status_code == 422 and "unreadable" in r.json()["detail"]
        assert httpx.get(f"{base}/api/steps/x").status_code == 422
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200  # the admin app is intact
    finally:
        server.stop()


def test_sample_every_is_typed_config():
    cfg = build_config({}, use_env=False)
    assert (cfg.metrics.sample_every, cfg.metrics.sample_rollouts, cfg.metrics.sample_keep) == (5, 16, 50)
    assert build_config({}, environ={"RLRT__METRICS__SAMPLE_EVERY": "0"}).metrics.sample_every == 0
    with pytest.raises(ValueError, match=r"metrics\.sample_every"):
        build_config({"metrics": {"sample_every": -1}}, use_env=False)


def test_learner_loop_writes_samples_every_n_steps(tmp_path):
    """The real loop (in-memory bus, tiny model): samples at steps 2 and 4 only, with the token
    pieces, D̂_t and D̄_t the scored groups carried."""
    cfg = _cfg(tmp_path, total_steps=4)
    cfg.metrics.sample_every = 2
    cfg.metrics.sample_rollouts = 3
    tok = load_tokenizer("tiny")
    h = Harness(cfg)
    h.loop._tokenizer = tok
    made = {}

    def with_d_bar(g):
        for i, sc in enumerate(g.teacher_scores):
            sc.position_kl.extend([0.125 * (i + 1) * (t + 1) for t in range(len(g.completions[i].token_ids))])
        made[g.group_id] = g

    h.loop.start()
    h.run(mutate=with_d_bar)
    files = sorted(p.name for p in (h.loop.run_dir / "samples").iterdir())
    assert files == ["step_000002.json", "step_000004.json"]
    assert h.loop.totals["samples_written"] == 2 and not h.loop._sample_src
    rows = {r["step"]: r for r in h.rows()}
    for step in (2, 4):
        doc = sm.read_step(h.loop.run_dir / "samples", step)
        assert doc["version"] == rows[step]["version"] and doc["method"] == cfg.algorithm.method
        assert [r["group_id"] for r in doc["rollouts"]] == [rows[step]["groups"][0]] * 2 + [rows[step]["groups"][1]]
        for r in doc["rollouts"]:
            g = made[r["group_id"]]
            c = g.completions[r["index"]]
            assert r["token_ids"] == list(c.token_ids)
            assert r["tokens"] == [tok.decode([i], clean_up_tokenization_spaces=False) for i in c.token_ids]
            assert r["d_hat"] == [0.5] * len(c.token_ids)  # student -2.0, teacher -2.5
            assert r["d_bar_topk"] == pytest.approx(list(g.teacher_scores[r["index"]].position_kl))
            assert r["reward"] == g.verifier_results[r["index"]].reward and r["version"] == g.version
        assert doc["histograms"]["d_hat"]["n"] == cfg.learner.groups_per_step * cfg.rollout.n_samples * 4
    # a resumed learner drops the samples of steps it re-trains
    assert h.loop.samples.drop_after(2) == 1


def test_a_resumed_learner_drops_the_samples_of_steps_it_trains_again(tmp_path):
    cfg = _cfg(tmp_path, total_steps=4, checkpoint_every=2)
    cfg.metrics.sample_every = 1
    h = Harness(cfg)
    h.loop.start()
    while h.loop.step < 3:  # checkpoint at 2, step 3 sampled, then the learner "dies"
        h.loop.round()
        h.stages()
    samples_dir = h.loop.run_dir / "samples"
    assert sorted(p.name for p in samples_dir.iterdir()) == [f"step_00000{i}.json" for i in (1, 2, 3)]
    h2 = Harness(cfg, bus=h.bus)
    h2.announced = h.announced
    h2.loop._read_announced = lambda: h2.announced[-1] if h2.announced else None
    h2.loop.start()
    assert sorted(p.name for p in samples_dir.iterdir()) == ["step_000001.json", "step_000002.json"]
    h2.run()
    assert [s["step"] for s in sm.list_steps(h.loop.run_dir)[0]] == [1, 2, 3, 4]
    assert sm.read_step(samples_dir, 3)["version"] == [r for r in h2.rows() if r["step"] == 3][0]["version"]


def test_rlrt_explore_refuses_a_missing_run_dir(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "services.cli.main", "explore", str(tmp_path / "nope")],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "is not a directory" in p.stderr
