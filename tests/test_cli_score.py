"""`rlrt score` as a real process: good lines scored, bad lines reported, a timeout counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rlrt_core.data import resolve_data_path

REPO = Path(__file__).resolve().parents[1]


def _rlrt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})


def test_score_mixed_file(tmp_path):
    lines = [
        json.dumps({"completion": "so \\boxed{18}", "answer": "18", "id": "a"}),
        json.dumps({"completion": "#### 1,234", "answer": 1234}),
        "not json at all",
        json.dumps({"completion": "no answer key"}),
        "",
        json.dumps({"completion": "\\boxed{10^{10^{10}}}", "answer": "5"}),
        json.dumps({"completion": "\\boxed{3", "answer": "3"}),
        json.dumps([1, 2]),
        json.dumps({"completion": "\\boxed{17}", "answer": "18"}),
    ]
    inp = tmp_path / "completions.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sub" / "scored.jsonl"
    t0 = time.monotonic()
    p = _rlrt("score", "--input", str(inp), "--output", str(out), "--timeout", "1", "--workers", "2", "--chunk", "3")
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 60
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8
    assert rows[0] == {"completion": "so \\boxed{18}", "answer": "18", "id": "a", "reward": 1.0, "extracted": "18",
                       "outcome": "correct"}
    assert rows[1]["reward"] == 1.0 and rows[1]["extracted"] == "1,234"
    assert rows[2]["outcome"] == "bad_line" and rows[2]["reason"].startswith("line 3: not valid JSON")
    assert rows[3]["reason"] == "line 4: missing field 'answer'" and rows[3]["reward"] == 0.0
    assert rows[4]["outcome"] == "timeout" and rows[4]["reward"] == 0.0 and "timeout" in rows[4]["reason"]
    assert rows[5]["outcome"] == "unparseable" and "unbalanced" in rows[5]["reason"]
    assert rows[6]["reason"] == "line 8: expected a JSON object, got list"
    assert rows[7]["outcome"] == "wrong" and "reason" not in rows[7]
    summary = " ".join(p.stderr.split())
    for name, val in [("lines", 8), ("checked lines", 5), ("correct", 2), ("wrong", 1), ("unparseable", 1), ("timeout", 1),
                      ("bad lines", 3)]:
        assert f"{name} │ {val} │" in summary, summary
    assert not (out.parent / "scored.jsonl.partial").exists()


def test_score_gsm8k_last_number(tmp_path):
    path = resolve_data_path("gsm8k-test")
    src = [json.loads(x) for x in path.open()][:150]
    inp = tmp_path / "in.jsonl"
    with inp.open("w") as fh:
        for i, row in enumerate(src):
            final = row["answer"].rpartition("####")[2].strip()
            # every third answer is wrong on purpose
            fh.write(json.dumps({"completion": row["answer"], "answer": final if i % 3 else final + "1"}) + "\n")
    out = tmp_path / "out.jsonl"
    p = _rlrt("score", "-i", str(inp), "-o", str(out), "--mode", "last_number", "--chunk", "64")
    assert p.returncode == 0, p.stderr
    rewards = [json.loads(x)["reward"] for x in out.read_text().splitlines()]
    assert rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(150)]


def test_score_usage_errors(tmp_path):
    p = _rlrt("score", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert p.returncode == 2 and "--input" in p.stderr and "no such file" in p.stderr
    (tmp_path / "x.jsonl").write_text("{}\n")
    p = _rlrt("score", "-i", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--mode", "fuzzy")
    assert p.returncode == 2 and "--mode" in p.stderr
