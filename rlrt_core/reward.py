"""Verifiable math reward: extract a final answer from a completion and decide whether it
equals the reference answer.

Extraction is ours (linear-time scans, no backtracking regexes on model text); equivalence
is decided by `math-verify` (sympy-based: `\\frac{1}{2}` = `0.5`, `x=3` = `3`, `90^\\circ` =
`90`, `1,234` = `1234`, `72%` = `0.72`). Two extraction modes:

- ``"boxed"`` (default, competition maths): the last ``\\boxed{...}`` / ``\\fbox{...}``
  (nested braces), else the last GSM8K-style ``#### 42`` line, else the last
  "The answer is: ..." / "Answer: ..." phrase.
- ``"last_number"`` (GSM8K style, small models): the final number in the completion.

`math_reward` checks one completion in-process. `Verifier` checks batches in a pool of
worker processes under a hard per-check time limit: math-verify's own timeouts use
SIGALRM, which only works on a main thread, so they are disabled in the workers and the
parent enforces ours by killing (and replacing) a worker that overruns. A timeout costs
reward 0 and is counted; it never hangs the caller.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable, Literal, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic
from sympy.matrices import MatrixBase

Mode = Literal["boxed", "last_number"]
MODES: tuple[str, ...] = ("boxed", "last_number")
OUTCOMES: tuple[str, ...] = ("correct", "wrong", "unparseable", "timeout", "error")

# Extracted answers longer than this are refused before sympy sees them (cost guard).
MAX_ANSWER_CHARS = 1000

logger = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    """Outcome of checking one completion.

    reward: 1.0 when the extracted answer equals the reference, else 0.0.
    extracted: the answer string taken from the completion (None when none was found).
    reason: why the completion could not be judged (None when it was judged right or wrong).
    timed_out: the check ran past the time limit.
    outcome: one of OUTCOMES (derived from the other fields unless given).
    """

    reward: float
    extracted: str | None
    reason: str | None
    timed_out: bool
    outcome: str = ""

    def __post_init__(self) -> None:
        if not self.outcome:
            if self.timed_out:
                self.outcome = "timeout"
            elif self.reward > 0:
                self.outcome = "correct"
            elif self.reason is not None:
                self.outcome = "unparseable"
            else:
                self.outcome = "wrong"

    def to_dict(self) -> dict[str, Any]:
        return {"reward": self.reward, "extracted": self.extracted, "reason": self.reason,
                "timed_out": self.timed_out, "outcome": self.outcome}


# --------------------------------------------------------------------------- extraction

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(.*)$", re.MULTILINE)
# "The answer is: 42", "The final answer is $42$", "Answer: 42": the marker; the answer is
# the rest of its sentence.
_ANSWER_MARK = re.compile(r"(?i)answer\s+is\s*:?|\banswer\s*:")
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)|,\s|\n")
# "42 apples" / "$18 per day": a number followed by words is the number. Possessive
# quantifiers keep every pattern that runs on model text linear-time (no backtracking).
_NUMBER_THEN_WORDS = re.compile(r"(\\?\$?[ \t]*+-?(?:\d[\d,]*+(?:\.\d++)?|\.\d++))[ \t]++[A-Za-z]{2}")
_HOPE = "i hope it is correct"
# Numbers: with thousands separators, decimals, or a bare decimal part. A minus sign
# counts only when it does not follow a word character ("5-3" ends in 3, not -3).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the `}` closing the `{` at `open_idx` (escaped `\\{`, `\\}` do not count)."""
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_boxed(text: str) -> tuple[str | None, str | None] | None:
    """Content of the last `\\boxed`/`\\fbox`; None when there is none, else (content, reason)."""
    last = None
    for last in _BOX_CMD.finditer(text):
        continue
    if last is None:
        return None
    i = last.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = _match_braces(text, i)
        if close is None:
            return None, "unbalanced braces in \\boxed{...}"
        content = text[i + 1:close]
    else:
        # `\boxed 5`: the argument is the next token.
        m = re.match(r"[^\s$]+", text[i:])
        if m is None:
            return None, "empty \\boxed"
        content = m.group(0)
    content = content.strip()
    if not content:
        return None, "empty \\boxed{}"
    return content, None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text`, or None."""
    found = _last_boxed(text)
    return found[0] if found else None


def _strip_hope(text: str) -> str:
    """Drop Minerva's trailing "I hope it is correct." (string ops: linear on any input)."""
    t = text.rstrip().rstrip(".").rstrip()
    if t[-len(_HOPE):].lower() == _HOPE:
        return t[:-len(_HOPE)].rstrip()
    return text.strip()


def _clean(ans: str) -> str:
    """Trim wrappers a model puts around a final answer: `$...$`, `\\(...\\)`, `**`, a final
    full stop, Minerva's "I hope it is correct"."""
    ans = _strip_hope(ans)
    for _ in range(4):  # bounded: each round is linear, nested wrappers are rare
        prev = ans
        ans = ans.lstrip(" \t\r\n*").rstrip(" \t\r\n*.")
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(ans) >= len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
                ans = ans[len(left):len(ans) - len(right)]
        if ans == prev:
            break
    return ans


def _answer_phrase(rest: str) -> str:
    """The answer after an "answer is" marker: up to the end of its sentence, a leading
    number when words follow it ("42 apples")."""
    rest = _strip_hope(rest.split("\n", 1)[0])
    # `$...$` may hold sentence punctuation ("$1,5$"): cut only outside math.
    i, n, in_math = 0, len(rest), False
    while i < n:
        if rest[i] == "\\":
            i += 2
            continue
        if rest[i] == "$":
            in_math = not in_math
        elif not in_math and _SENTENCE_END.match(rest, i) and not (rest[i] == "," and i > 0 and rest[i - 1].isdigit()
                                                                    and rest[i + 1:i + 4].isdigit()):
            break
        i += 1
    ans = _clean(rest[:i])
    m = _NUMBER_THEN_WORDS.match(ans)
    return m.group(1) if m else ans


def _extract(completion: str, mode: str) -> tuple[str | None, str | None]:
    """(extracted answer, reason it is missing)."""
    if mode == "last_number":
        last = None
        for last in _NUMBER.finditer(completion):
            continue
        if last is None:
            return None, "no number in completion"
        return last.group(0), None
    if mode != "boxed":
        raise ValueError(f"unknown extraction mode {mode!r}; expected one of {MODES}")
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    hashes = None
    for hashes in _HASH_LINE.finditer(completion):
        continue
    if hashes is not None:
        ans = _clean(hashes.group(1))
        return (ans, None) if ans else (None, "empty '####' answer line")
    mark = None
    for mark in _ANSWER_MARK.finditer(completion):
        continue
    if mark is not None:
        ans = _answer_phrase(completion[mark.end():])
        return (ans, None) if ans else (None, "empty 'answer is' phrase")
    return None, "no \\boxed{}, '####' line or 'answer is' phrase"


def extract_answer(completion: str, *, mode: Mode = "boxed") -> str | None:
    """The final answer of `completion` under `mode` ("boxed" or "last_number"), or None."""
    return _extract(completion, mode)[0]


# --------------------------------------------------------------------------- equivalence

_PARSE_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _parse_math(answer: str, parse_timeout: int | None) -> list[Any]:
    # Boxing the already-extracted answer makes math-verify read all of it as one LaTeX
    # expression (plain "0.5" or "1,234" parse the same way inside a box).
    return parse("\\boxed{" + answer + "}", extraction_config=_PARSE_CONFIG,
                 parsing_timeout=parse_timeout)  # type: ignore[arg-type]


@lru_cache(maxsize=4096)
def _parse_reference(answer: str, parse_timeout: int | None) -> tuple[Any, ...]:
    # A group of K completions shares one reference: parse it once per process.
    return tuple(_parse_math(_clean(answer), parse_timeout))


def _is_math(parsed: Iterable[Any]) -> bool:
    return any(isinstance(p, (Basic, MatrixBase)) for p in parsed)


def _check(completion: Any, reference: Any, mode: str, signal_timeout: int | None) -> VerifyResult:
    """Judge one completion. `signal_timeout` enables math-verify's SIGALRM limits (main
    thread only); None disables them (pool workers, where the parent enforces the limit)."""
    if not isinstance(completion, str):
        return VerifyResult(0.0, None, f"completion must be a string, got {type(completion).__name__}", False)
    if not isinstance(reference, str):
        return VerifyResult(0.0, None, f"reference answer must be a string, got {type(reference).__name__}", False)
    extracted, reason = _extract(completion, mode)
    if extracted is None:
        return VerifyResult(0.0, None, reason, False)
    if len(extracted) > MAX_ANSWER_CHARS:
        return VerifyResult(0.0, extracted[:80] + "...", f"answer longer than {MAX_ANSWER_CHARS} characters", False)
    gold = list(_parse_reference(reference, signal_timeout))
    if not gold:
        return VerifyResult(0.0, extracted, "reference answer not parseable", False)
    pred = _parse_math(extracted, signal_timeout)
    if not pred:
        return VerifyResult(0.0, extracted, "answer not parseable", False)
    ok = verify(gold, pred, timeout_seconds=signal_timeout)
    if ok:
        return VerifyResult(1.0, extracted, None, False)
    if _is_math(gold) and not _is_math(pred):
        return VerifyResult(0.0, extracted, "answer not parseable", False)
    return VerifyResult(0.0, extracted, None, False)


def math_reward(completion: str, reference_answer: str, *, mode: Mode = "boxed") -> float:
    """1.0 if the final answer of `completion` equals `reference_answer`, else 0.0.

    Runs in-process. On the main thread math-verify's own 5 s limits apply; elsewhere there
    is no limit: for untrusted model output at scale use `Verifier` (hard limits, pool)."""
    main = threading.current_thread() is threading.main_thread()
    return _check(completion, reference_answer, mode, 5 if main else None).reward


# --------------------------------------------------------------------------- worker pool

# Parent <-> worker messages are JSON bytes (plain strings and numbers; nothing is unpickled):
#   parent -> worker: {"mode": m, "tasks": [[task_id, completion, answer], ...]} or null to stop
#   worker -> parent: ["ready", pid] once, then one [task_id, reward, extracted, reason, outcome]
#   per task, in order, as soon as it is done (so the parent times each task separately).

def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(json.dumps(obj).encode("utf-8"))


def _recv(conn: Connection) -> Any:
    return json.loads(conn.recv_bytes().decode("utf-8"))


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Pool worker: check the tasks of each message, one reply per task, until EOF/null."""
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb << 20
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            logger.debug("could not set the worker memory limit", exc_info=True)
    # Timeouts are the parent's job here; silence math-verify's "timeout disabled" notice.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _check("\\boxed{\\frac{1}{2}}", "0.5", "boxed", None)  # warm sympy's caches
    _send(conn, ["ready", os.getpid()])
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for task_id, completion, answer in msg["tasks"]:
            try:
                res = _check(completion, answer, msg["mode"], None)
            except MemoryError:
                res = VerifyResult(0.0, None, "memory limit exceeded", False, "error")
            except Exception as err:  # a bug or a sympy crash must not kill the worker
                res = VerifyResult(0.0, None, f"checker error: {type(err).__name__}: {err}"[:300], False, "error")
            _send(conn, [task_id, res.reward, res.extracted, res.reason, res.outcome])


class _Worker:
    def __init__(self, ctx: Any, memory_limit_mb: int | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_limit_mb), daemon=True,
                                name="rlrt-verifier")
        self.proc.start()
        child.close()
        self.ready = False
        self.tasks: deque[int] = deque()  # sent, not yet answered, in the order the worker runs them
        self.deadline = 0.0  # when the task at the head of `tasks` runs out of time
        self.started = time.monotonic()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _safe_extract(completion: Any, mode: str) -> str | None:
    return _extract(completion, mode)[0] if isinstance(completion, str) else None


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            if w.proc.is_alive():
                _send(w.conn, None)
        except (OSError, ValueError):
            logger.debug("worker pipe already closed", exc_info=True)
    for w in workers:
        w.proc.join(timeout=2)
        w.kill()
    workers.clear()


class Verifier:
    """Batch verifier: a pool of `workers` processes, each check limited to `timeout_s`.

    A check that overruns is answered with reward 0 (`timed_out=True`, outcome "timeout"),
    its worker is killed and replaced. Results come back in input order and do not depend
    on which worker ran them. Thread-safe (calls are serialised). Use as a context manager
    or call `close()`; leaked pools are reaped at garbage collection.

    memory_limit_mb: address-space limit of each worker (RLIMIT_AS), None for no limit.
    start_method: multiprocessing start method; "forkserver" forks workers from a clean
    server that has imported sympy once, so a replacement is ready in milliseconds.
    max_chunk: most tasks queued on one worker at a time (fewer round trips; each task
    is still timed on its own).
    """

    def __init__(self, mode: Mode = "boxed", timeout_s: float = 5.0, workers: int = 2, *,
                 memory_limit_mb: int | None = 4096, start_method: str = "forkserver",
                 startup_timeout_s: float = 120.0, max_chunk: int = 32) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown extraction mode {mode!r}; expected one of {MODES}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.num_workers = workers
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.max_chunk = max_chunk
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["rlrt_core.reward"])
        self._lock = threading.Lock()
        self._workers: list[_Worker] = [self._spawn() for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.counters: Counter[str] = Counter()  # outcomes + "restarts" over the pool's life

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.memory_limit_mb)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()
        self.counters["restarts"] += 1

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify_group(self, completions: Sequence[str], answer: str) -> list[VerifyResult]:
        """Check the K completions of one prompt group against its reference `answer`."""
        return self.verify(completions, [answer] * len(completions))

    def verify(self, completions: Sequence[str], answers: Sequence[str], *,
               mode: Mode | None = None) -> list[VerifyResult]:
        """Check `completions[i]` against `answers[i]`; returns one result per completion."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"unknown extraction mode {mode!r}; expected one of {MODES}")
        if self.closed:
            raise RuntimeError("Verifier is closed")
        results: list[VerifyResult | None] = [None] * len(completions)
        todo: deque[int] = deque()
        for i, (c, a) in enumerate(zip(completions, answers)):
            if isinstance(c, str) and isinstance(a, str):
                todo.append(i)
            else:  # type errors are answered here: only strings cross the pipe
                results[i] = _check(c, a, mode, None)
        with self._lock:
            self._run(list(completions), list(answers), mode, todo, results)
        out = [r for r in results if r is not None]
        self.counters.update(r.outcome for r in out)
        return out

    def _run(self, completions: list[str], answers: list[str], mode: str, todo: deque[int],
             results: list[VerifyResult | None]) -> None:
        while todo or any(w.tasks for w in self._workers):
            now = time.monotonic()
            idle = [w for w in self._workers if w.ready and not w.tasks]
            for j, w in enumerate(idle):
                if not todo:
                    break
                # Split what is left evenly over the idle workers, at most max_chunk each.
                size = min(self.max_chunk, -(-len(todo) // (len(idle) - j)))
                chunk = [todo.popleft() for _ in range(min(size, len(todo)))]
                try:
                    _send(w.conn, {"mode": mode, "tasks": [[i, completions[i], answers[i]] for i in chunk]})
                except (OSError, ValueError):
                    todo.extendleft(reversed(chunk))
                    self._replace(w)
                    continue
                w.tasks.extend(chunk)
                w.deadline = now + self.timeout_s
            waits = [w.deadline for w in self._workers if w.tasks]
            waits += [w.started + self.startup_timeout_s for w in self._workers if not w.ready]
            next_deadline = min(waits, default=now + self.timeout_s)
            ready = wait([w.conn for w in self._workers], timeout=max(0.0, next_deadline - now))
            by_conn = {id(w.conn): w for w in self._workers}
            for conn in ready:
                w = by_conn[id(conn)]
                try:
                    while True:  # drain every reply already queued on this pipe
                        msg = _recv(w.conn)
                        if msg[0] == "ready":
                            w.ready = True
                        else:
                            task_id, reward, extracted, reason, outcome = msg
                            if not w.tasks or w.tasks[0] != task_id:
                                raise RuntimeError(f"verifier worker answered task {task_id} out of order")
                            w.tasks.popleft()
                            results[task_id] = VerifyResult(reward, extracted, reason, False, outcome)
                            w.deadline = time.monotonic() + self.timeout_s
                        if not w.conn.poll():
                            break
                except (EOFError, OSError):
                    code = w.proc.exitcode
                    if not w.ready:
                        raise RuntimeError(
                            f"verifier worker failed to start (exit code {code}); a script that creates a "
                            "Verifier at import time needs an `if __name__ == '__main__':` guard") from None
                    if w.tasks:  # the task it was running killed it; the rest are retried
                        results[w.tasks[0]] = VerifyResult(0.0, _safe_extract(completions[w.tasks[0]], mode),
                                                           f"verifier worker died (exit code {code})", False,
                                                           "error")
                        w.tasks.popleft()
                        todo.extendleft(reversed(w.tasks))
                    self._replace(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.tasks and now >= w.deadline:
                    head = w.tasks.popleft()
                    # Our extraction is a linear scan: safe to redo here for the report.
                    results[head] = VerifyResult(0.0, _safe_extract(completions[head], mode),
                                                 f"timeout after {self.timeout_s:g} s", True)
                    todo.extendleft(reversed(w.tasks))
                    self._replace(w)
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RuntimeError(f"verifier worker did not start within {self.startup_timeout_s:g} s")


def score_group(verifier: Verifier, completions: Sequence[str], answer: str) -> list[VerifyResult]:
    """Rewards of one rollout group (what the verifier service calls per group)."""
    return verifier.verify_group(completions, answer)


def summarize(results: Iterable[VerifyResult]) -> dict[str, float]:
    """Counts by outcome (correct, wrong, unparseable, timeout, error), total and accuracy."""
    counts = Counter(r.outcome for r in results)
    total = sum(counts.values())
    out: dict[str, float] = {k: counts.get(k, 0) for k in OUTCOMES}
    out["total"] = total
    out["accuracy"] = counts.get("correct", 0) / total if total else 0.0
    return out
