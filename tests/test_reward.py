"""Math verifier: answer extraction, math-verify equivalences, the timed worker pool, and
GSM8K reference solutions checked against their own (and other problems') answers."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from rlrt_core.data import load_jsonl, resolve_data_path
from rlrt_core.reward import (
    MAX_ANSWER_CHARS,
    OUTCOMES,
    Verifier,
    VerifyResult,
    extract_answer,
    last_boxed,
    math_reward,
    score_group,
    summarize,
)

# A power tower sympy really spends seconds on when compared with a number (measured: > 3 s).
SLOW_ANSWER = "\\boxed{10^{10^{10}}}"


@pytest.fixture(scope="module")
def verifier():
    with Verifier(mode="boxed", timeout_s=10.0, workers=2) as v:
        yield v


# --------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("completion, expected", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} first, then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 7 apples", "7"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("#### 1,234\n", "1,234"),
    ("The answer is: 42", "42"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is 42 apples because she sells them.", "42"),
    ("Final Answer: The final answer is $72\\%$. I hope it is correct.", "72\\%"),
    ("Answer: 3.5.", "3.5"),
    ("#### 5\nbut boxed wins: \\boxed{6}", "6"),
])
def test_extract_boxed_mode(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion", [
    "no final answer here, just 12 and 13",
    "\\boxed{}",
    "\\boxed{5",  # unbalanced: the model's last box is malformed, earlier text does not count
    "\\boxed{\\frac{1}{2}",
    "#### \n",
])
def test_extract_boxed_mode_none(completion):
    assert extract_answer(completion) is None


@pytest.mark.parametrize("completion, expected", [
    ("3 + 4 = 7", "7"),
    ("The total is 1,234,567 dollars.", "1,234,567"),
    ("5-3 = 2", "2"),
    ("x = -3.", "-3"),
    ("it costs $0.75 each", "0.75"),
    ("\\boxed{\\frac{1}{2}}", "2"),
    ("#### 18", "18"),
    ("v2 beats 1,2345", "2345"),
])
def test_extract_last_number(completion, expected):
    assert extract_answer(completion, mode="last_number") == expected


def test_extract_last_number_none_and_bad_mode():
    assert extract_answer("no digits at all", mode="last_number") is None
    with pytest.raises(ValueError, match="unknown extraction mode 'nope'"):
        extract_answer("1", mode="nope")  # type: ignore[arg-type]


ADVERSARIAL = {
    "spaces": "The answer is $" + " " * 200_000,
    "digits": "The answer is " + "1" * 200_000 + "x",
    "digit words": "The answer is 1" + "1" * 200_000 + " apples",
    "dots": "#### 5" + " ." * 100_000,
    "dollars": "#### " + "$" * 100_000 + "5" + "$" * 100_000,
    "braces": "\\boxed{" + "{" * 200_000,
    "boxes": "\\boxed{1}" * 50_000,
    "commas": "answer: " + "1," * 100_000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_extraction_is_linear_time(name):
    # Extraction runs on raw model text, also in the parent process (timeout reports), so
    # no input may make it backtrack: 200k characters must take well under a second.
    for mode in ("boxed", "last_number"):
        t0 = time.perf_counter()
        extract_answer(ADVERSARIAL[name], mode=mode)
        assert time.perf_counter() - t0 < 1.5, (name, mode)


def test_last_boxed_nested_and_escaped():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\left\\{ 1 \\right\\}}") == "\\left\\{ 1 \\right\\}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{open") is None


# --------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
    ("\\boxed{x=3}", "3"),
    ("\\boxed{3}", "x=3"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{1234}", "1,234"),
    ("\\boxed{1,234}", "1234"),
    ("\\boxed{5}", "$5"),
    ("\\boxed{\\$5}", "5"),
    ("\\boxed{5 \\text{ dollars}}", "5"),
    ("\\boxed{72\\%}", "72%"),
    ("\\boxed{72}", "72%"),
    ("\\boxed{5.00}", "5"),
    ("\\boxed{10^{400}}", "1" + "0" * 400),
    ("\\boxed{" + "9" * 900 + "}", "9" * 900),
])
def test_equivalent(completion, reference):
    assert math_reward(completion, reference) == 1.0


@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{19}", "18"),
    ("\\boxed{3.01}", "3"),
    ("\\boxed{\\frac{1}{3}}", "0.3"),
    ("\\boxed{(3, \\frac{\\pi}{3})}", "(3, \\frac{\\pi}{2})"),
    ("\\boxed{" + "9" * 899 + "8}", "9" * 900),
    ("\\boxed{12345678901234567890124}", "12345678901234567890123"),
])
def test_not_equivalent(completion, reference):
    assert math_reward(completion, reference) == 0.0


def test_last_number_mode_rewards():
    assert math_reward("3 + 4 = 7", "7", mode="last_number") == 1.0
    assert math_reward("3 + 4 = 7. Check: 7 - 4 = 3", "7", mode="last_number") == 0.0
    assert math_reward("3 + 4 = 7", "7") == 0.0  # strict boxed mode: no marker, no reward
    assert math_reward("She pays $1,450,000 in total", "1,450,000", mode="last_number") == 1.0


def test_math_reward_off_main_thread():
    # math-verify's SIGALRM timeouts would raise off the main thread; ours disables them there.
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\frac{2}{4}}", "0.5")))
    t.start()
    t.join(30)
    assert out == [1.0]


# --------------------------------------------------------------------------- pool

def test_verifier_reasons_and_outcomes(verifier):
    completions = [
        "\\boxed{4}",                     # correct
        "\\boxed{5}",                     # wrong
        "nothing to see",                 # no answer
        "\\boxed{\\frac{1}{}}",           # malformed LaTeX
        "\\boxed{3",                      # unbalanced
        "\\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}",  # too long for sympy
        "\\boxed{" + "7" * 5000 + "}",    # a giant number: refused by length, not a crash
    ]
    res = verifier.verify(completions, ["4"] * len(completions))
    assert [r.outcome for r in res[:6]] == ["correct", "wrong", "unparseable", "unparseable", "unparseable",
                                            "unparseable"]
    assert res[0] == VerifyResult(1.0, "4", None, False)
    assert res[1].reason is None and res[1].extracted == "5"
    assert "no \\boxed{}" in res[2].reason
    assert res[3].reason == "answer not parseable" and res[3].extracted == "\\frac{1}{}"
    assert "unbalanced" in res[4].reason
    assert "longer than" in res[5].reason
    assert res[6].reward == 0.0 and res[6].outcome in ("wrong", "unparseable") and not res[6].timed_out


def test_verifier_bad_inputs(verifier):
    res = verifier.verify([None, "\\boxed{1}", "\\boxed{1}"], ["1", 1, "\\frac{"])  # type: ignore[list-item]
    assert "completion must be a string" in res[0].reason
    assert "reference answer must be a string" in res[1].reason
    assert res[2].reward == 0.0
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        verifier.verify(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="unknown extraction mode"):
        verifier.verify(["a"], ["1"], mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown extraction mode"):
        Verifier(mode="fuzzy")  # type: ignore[arg-type]


def test_verify_group_score_group_summary(verifier):
    group = ["\\boxed{18}", "#### 18", "The answer is 18.", "\\boxed{17}", "I don't know", "\\boxed{18.0}"]
    res = verifier.verify_group(group, "18")
    assert [r.reward for r in res] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert score_group(verifier, group, "18") == res
    s = summarize(res)
    assert {k: s[k] for k in OUTCOMES} == {"correct": 4, "wrong": 1, "unparseable": 1, "timeout": 0, "error": 0}
    assert s["total"] == 6 and s["accuracy"] == pytest.approx(4 / 6)
    assert verifier.verify_group([], "1") == []


def test_verify_from_worker_thread_and_huge_input(verifier):
    # services call the pool from their own threads; extraction stays linear on long text
    long = "Let me think. " + "{(" * 200_000 + "x" * 300_000 + "\n#### 12"
    out: list = []
    t = threading.Thread(target=lambda: out.extend(verifier.verify([long, "\\boxed{\ud800}"], ["12", "1"])))
    t0 = time.monotonic()
    t.start()
    t.join(60)
    assert time.monotonic() - t0 < 10
    assert out[0].reward == 1.0 and out[0].extracted == "12"
    assert out[1].reward == 0.0 and not out[1].timed_out


def test_pool_results_deterministic_and_ordered():
    rng = random.Random(0)
    answers = [str(rng.randint(0, 50)) for _ in range(60)]
    completions = [f"so \\boxed{{{rng.randint(0, 50)}}}" if i % 3 else f"#### {a}" for i, a in enumerate(answers)]
    with Verifier(workers=1, timeout_s=10) as one, Verifier(workers=2, timeout_s=10) as two:
        a = one.verify(completions, answers)
        b = two.verify(completions, answers)
        c = two.verify(completions, answers)
    assert a == b == c
    assert [r.reward for r in a] == [math_reward(x, y) for x, y in zip(completions, answers)]


def test_timeout_kills_and_replaces_worker():
    timeout_s = 1.5
    with Verifier(workers=2, timeout_s=timeout_s) as v:
        v.verify(["\\boxed{1}"], ["1"])  # both workers up
        pids_before = {w.proc.pid for w in v._workers}
        t0 = time.monotonic()
        res = v.verify([SLOW_ANSWER, "\\boxed{2}", "\\boxed{3}"], ["5", "2", "4"])
        elapsed = time.monotonic() - t0
        assert elapsed < timeout_s + 2.0, f"pool took {elapsed:.1f} s for a {timeout_s} s limit"
        assert res[0].timed_out and res[0].reward == 0.0 and res[0].outcome == "timeout"
        assert res[0].extracted == "10^{10^{10}}" and "timeout" in res[0].reason
        assert [r.outcome for r in res[1:]] == ["correct", "wrong"]
        assert v.counters["timeout"] == 1 and v.counters["restarts"] == 1
        assert len(pids_before - {w.proc.pid for w in v._workers}) == 1
        # the pool keeps working after the replacement
        assert [r.reward for r in v.verify(["\\boxed{7}"] * 4, ["7"] * 4)] == [1.0] * 4
    assert v.closed
    with pytest.raises(RuntimeError, match="closed"):
        v.verify(["\\boxed{1}"], ["1"])


def test_worker_killed_from_outside_is_replaced():
    with Verifier(workers=1, timeout_s=10) as v:
        v.verify(["\\boxed{1}"], ["1"])
        pid = v._workers[0].proc.pid
        os.kill(pid, signal.SIGKILL)
        v._workers[0].proc.join(5)
        res = v.verify(["\\boxed{2}", "\\boxed{3}"], ["2", "3"])
        assert [r.reward for r in res] == [1.0, 1.0]
        assert v._workers[0].proc.pid != pid and v.counters["restarts"] == 1


def test_close_stops_workers():
    v = Verifier(workers=2, timeout_s=5)
    v.verify(["\\boxed{1}"], ["1"])
    procs = [w.proc for w in v._workers]
    v.close()
    v.close()  # idempotent
    assert all(not p.is_alive() for p in procs)


# --------------------------------------------------------------------------- GSM8K

def _gsm8k(name: str) -> tuple[list[str], list[str], list[str]]:
    path = resolve_data_path(name)
    raw = [json.loads(line)["answer"] for line in path.open()]
    probs = load_jsonl(path)
    assert len(raw) == len(probs)
    return raw, [p.answer for p in probs], [p.solution or "" for p in probs]


def _model_like(solution: str, answer: str, style: int) -> str:
    # Reference solutions reformatted the way a model ends its answer.
    return [f"{solution}\nThe answer is \\boxed{{{answer}}}.",
            f"{solution}\nThe answer is: {answer}",
            f"{solution}\n#### {answer}"][style % 3]


def test_gsm8k_reference_solutions_verify(verifier):
    raw, answers, solutions = _gsm8k("gsm8k-test")
    idx = random.Random(1).sample(range(len(raw)), 300)
    own = verifier.verify([raw[i] for i in idx], [answers[i] for i in idx])
    assert summarize(own)["correct"] == 300
    styled = [_model_like(solutions[i], answers[i], k) for k, i in enumerate(idx)]
    assert summarize(verifier.verify(styled, [answers[i] for i in idx]))["correct"] == 300
    assert summarize(verifier.verify([raw[i] for i in idx], [answers[i] for i in idx], mode="last_number"))[
        "correct"] == 300
    # against another problem's answer (numerically different): all wrong
    other = [(i, answers[(i + 7) % len(answers)]) for i in idx]
    other = [(i, a) for i, a in other if a.replace(",", "") != answers[i].replace(",", "")]
    wrong = verifier.verify([raw[i] for i, _ in other], [a for _, a in other])
    assert len(other) > 280 and summarize(wrong)["wrong"] == len(other)


@pytest.mark.slow
def test_all_gsm8k_reference_solutions_verify():
    """Every GSM8K train+test reference solution verifies against its own answer in both
    modes (counts reported in docs/BENCHMARKS.md)."""
    counts = {}
    with Verifier(workers=2, timeout_s=10) as v:
        for name in ("gsm8k-train", "gsm8k-test"):
            raw, answers, _ = _gsm8k(name)
            for mode in ("boxed", "last_number"):
                s = summarize(v.verify(raw, answers, mode=mode))  # type: ignore[arg-type]
                counts[(name, mode)] = (int(s["correct"]), int(s["total"]))
    assert counts == {("gsm8k-train", "boxed"): (7473, 7473), ("gsm8k-train", "last_number"): (7473, 7473),
                      ("gsm8k-test", "boxed"): (1319, 1319), ("gsm8k-test", "last_number"): (1319, 1319)}
