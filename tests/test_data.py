"""Data sets: shipped GSM8K, format detection, bad-row reports, arithmetic generator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlrt_core.config import DataConfig, load_config
from rlrt_core.data import (
    DataError,
    Problem,
    arithmetic_problems,
    data_dir,
    detect_format,
    load_jsonl,
    load_problems,
    resolve_data_path,
    split_gsm8k_answer,
)
from rlrt_core.reward import math_reward

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
    path.write_bytes(b"\n".join(x.encode() if isinstance(x, str) else x for x in lines) + b"\n")
    return path


def test_shipped_gsm8k():
    assert (data_dir() / "gsm8k" / "GSM8K_LICENSE").read_text().startswith("MIT License")
    train = load_problems(DataConfig(source="jsonl", path="gsm8k-train", instruction=""))
    test = load_problems(DataConfig(source="jsonl", path="gsm8k-test", instruction=""))
    assert (len(train), len(test)) == (7473, 1319)
    first = test[0]
    assert first.id == "gsm8k_test-1" and first.answer == "18"
    assert first.prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer\u2019s market.")
    for p in train + test:
        assert "<<" not in (p.solution or "") and "####" not in (p.solution or "")
        assert p.answer and "####" not in p.answer
    assert len({p.id for p in train}) == 7473


def test_gsm8k_recipe_loads_with_its_instruction(tmp_path, monkeypatch):
    cfg = load_config(REPO / "configs" / "gsm8k-smollm2.yaml", use_env=False)
    monkeypatch.chdir(tmp_path)  # the recipe's data/... path still resolves to the shipped copy
    probs = load_problems(cfg.data)
    assert len(probs) == 7473
    assert probs[0].prompt.endswith("\n\n" + cfg.data.instruction)


def test_split_gsm8k_answer():
    assert split_gsm8k_answer("He has 2*3=<<2*3=6>>6 apples.\n#### 6") == ("He has 2*3=6 apples.", "6")
    assert split_gsm8k_answer("#### 1,234") == ("", "1,234")
    with pytest.raises(ValueError, match="no '####'"):
        split_gsm8k_answer("just text")
    with pytest.raises(ValueError, match="empty answer"):
        split_gsm8k_answer("text ####   ")


def test_formats_detected(tmp_path):
    gsm = _write(tmp_path / "g.jsonl", [{"question": "Q1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    math_ = _write(tmp_path / "m.jsonl", [
        {"problem": "P1", "solution": "So $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac12"},
        {"problem": "P2", "solution": "First \\boxed{1}, finally \\boxed{x^{2}}."},
    ])
    gen = _write(tmp_path / "x.jsonl", [{"prompt": "Say 3", "answer": 3, "id": "a"},
                                        {"prompt": "Say 4", "answer": "4", "solution": "four"}])
    assert load_jsonl(gsm) == [Problem(id="g-1", prompt="Q1?", answer="2", solution="1+1=2")]
    m = load_jsonl(math_)
    assert [p.answer for p in m] == ["\\frac12", "x^{2}"]
    assert m[1].solution == "First \\boxed{1}, finally \\boxed{x^{2}}."
    g = load_jsonl(gen)
    assert [(p.id, p.answer, p.solution) for p in g] == [("a", "3", None), ("x-2", "4", "four")]
    # an explicit format overrides detection
    with pytest.raises(DataError, match="missing field 'question'"):
        load_jsonl(gen, format="gsm8k", on_bad_row="fail")


def test_generic_field_map_and_instruction(tmp_path):
    f = _write(tmp_path / "qa.jsonl", [{"q": "What is 2+2?", "target": 4.0, "why": "2+2=4", "uid": 17}])
    cfg = DataConfig(source="jsonl", path="qa.jsonl", format="auto", instruction="Reply with only the number.",
                     field_map={"prompt": "q", "answer": "target", "solution": "why", "id": "uid"})
    [p] = load_problems(cfg, base_dir=tmp_path)
    assert p == Problem(id="17", prompt="What is 2+2?\n\nReply with only the number.", answer="4.0", solution="2+2=4")
    with pytest.raises(DataError, match=r"unknown keys \['question'\]"):
        load_jsonl(f, field_map={"question": "q"})


def test_detect_format_names_keys():
    assert detect_format({"question": "q", "answer": "a\n#### 1"}) == "gsm8k"
    assert detect_format({"problem": "p", "solution": "s"}) == "math"
    assert detect_format({"prompt": "p", "answer": "1"}) == "generic"
    with pytest.raises(ValueError, match=r"keys \['foo'\]"):
        detect_format({"foo": 1})


BAD_ROWS = [
    {"question": "ok?", "answer": "x\n#### 1"},   # 1 good (fixes the format: gsm8k)
    "{not json",                                 # 2
    {"question": "no answer"},                   # 3
    {"question": 5, "answer": "#### 2"},         # 4 wrong type
    [1, 2],                                      # 5 not an object
    {"question": "no hashes", "answer": "7"},    # 6
    "",                                          # blank: ignored
    b"\xff\xfe{}",                               # 8 not UTF-8
    {"question": "ok2?", "answer": "#### 3", "id": "gsm8k-ok"},   # 9 good
    {"question": "dup", "answer": "#### 4", "id": "gsm8k-ok"},    # 10 duplicate id
]


def test_bad_rows_skipped_with_file_and_line(tmp_path, caplog):
    f = _write(tmp_path / "bad.jsonl", BAD_ROWS)
    with caplog.at_level(logging.WARNING, logger="rlrt_core.data"):
        probs = load_jsonl(f)
    assert [p.answer for p in probs] == ["1", "3"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 7
    for line, what in [(2, "not valid JSON"), (3, "missing field 'answer'"), (4, "'question' must be a string"),
                       (5, "expected a JSON object"), (6, "no '####'"), (8, "not UTF-8"), (10, "duplicate id")]:
        assert any(f"{f}:{line}: " in w and what in w for w in warned), (line, what, warned)


def test_bad_rows_fail_lists_them_all(tmp_path):
    f = _write(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as err:
        load_problems(DataConfig(source="jsonl", path=str(f), on_bad_row="fail"))
    assert [r.line for r in err.value.bad_rows] == [2, 3, 4, 5, 6, 8, 10]
    assert "7 bad row(s)" in str(err.value) and f"{f}:3: missing field 'answer'" in str(err.value)


def test_unusable_files(tmp_path):
    with pytest.raises(DataError, match="no usable problems"):
        load_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="no usable problems") as err:
        load_jsonl(_write(tmp_path / "allbad.jsonl", ["nope", "[]"]))
    assert len(err.value.bad_rows) == 2
    with pytest.raises(DataError, match="cannot detect the format"):
        load_jsonl(_write(tmp_path / "unknown.jsonl", [{"text": "hi"}]), on_bad_row="fail")
    with pytest.raises(DataError, match="data file not found: missing.jsonl"):
        load_problems(DataConfig(source="jsonl", path="missing.jsonl"), base_dir=tmp_path)
    with pytest.raises(DataError, match="answer' must be a string or number, got bool"):
        load_jsonl(_write(tmp_path / "b.jsonl", [{"prompt": "p", "answer": True}]), on_bad_row="fail")
    with pytest.raises(DataError, match=r"no 'answer' field and no \\boxed"):
        load_jsonl(_write(tmp_path / "m.jsonl", [{"problem": "p", "solution": "no box"}]), on_bad_row="fail")


def test_max_problems_and_paths(tmp_path):
    assert len(load_problems(DataConfig(source="jsonl", path="gsm8k-test", max_problems=5))) == 5
    assert resolve_data_path("gsm8k-train") == data_dir() / "gsm8k" / "gsm8k_train.jsonl"
    assert resolve_data_path("data/gsm8k/gsm8k_test.jsonl", base_dir=tmp_path).name == "gsm8k_test.jsonl"
    f = _write(tmp_path / "one.jsonl", [{"prompt": "p", "answer": "1"}])
    assert resolve_data_path(str(f)) == f


def test_arithmetic_problems():
    a = arithmetic_problems(digits=1, ops=["+"], num_problems=50, seed=3, instruction="Reply with only the number.")
    assert a == arithmetic_problems(digits=1, ops=["+"], num_problems=50, seed=3,
                                    instruction="Reply with only the number.")
    assert a[:20] == arithmetic_problems(digits=1, ops=["+"], num_problems=20, seed=3,
                                         instruction="Reply with only the number.")
    assert a != arithmetic_problems(digits=1, ops=["+"], num_problems=50, seed=4, instruction="Reply with only the number.")
    assert a[0].prompt.startswith("What is ") and a[0].prompt.endswith("? Reply with only the number.")
    b = arithmetic_problems(digits=3, ops=["+", "-", "*"], num_problems=300, seed=0, instruction=None)
    assert {p.prompt.split()[3] for p in b} == {"+", "-", "*"}
    for p in b:
        _, _, x, op, y = p.prompt.rstrip("?").split()
        assert 100 <= int(x) <= 999 and 100 <= int(y) <= 999
        assert p.answer == str(eval(f"{x}{op}{y}")) and int(p.answer) >= 0
        assert math_reward(p.solution, p.answer, mode="last_number") == 1.0
    assert len({p.id for p in b}) == 300
    for bad in [dict(digits=0), dict(ops=["/"]), dict(ops=[]), dict(num_problems=0)]:
        with pytest.raises(ValueError):
            arithmetic_problems(**{**dict(digits=1, ops=["+"], num_problems=3, seed=0, instruction=None), **bad})


def test_load_problems_arithmetic_from_config():
    cfg = DataConfig(source="arithmetic", arithmetic={"digits": 2, "ops": ["-"], "num_problems": 40, "seed": 1},
                     max_problems=10)
    probs = load_problems(cfg)
    assert len(probs) == 10 and all(p.prompt.endswith(cfg.instruction) for p in probs)
    assert all(" - " in p.prompt for p in probs)
