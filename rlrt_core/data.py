"""Problem sets: JSONL loaders (GSM8K, MATH-style, generic) and a built-in arithmetic generator.

Every source yields `Problem(id, prompt, answer, solution)`; `solution` (a worked reference
solution) is the teacher's privileged context when the data set has one.

JSONL formats (`DataConfig.format`, "auto" detects from the first JSON object):
- ``gsm8k``: ``{"question", "answer"}`` where answer is the worked text, a ``#### 42`` line
  last; answer = after ``####``, solution = the text before with ``<<48/2=24>>``
  calculator annotations removed.
- ``math``: ``{"problem", "solution", "answer"?}``; without an answer field the answer is
  the solution's last ``\\boxed{}``.
- ``generic``: ``{"prompt", "answer", "solution"?, "id"?}``, renamed by
  ``DataConfig.field_map`` (``{"prompt": "question", "answer": "target"}``).

Bad rows (not JSON, missing fields, wrong types) are collected with file and line; with
``on_bad_row="skip"`` each is logged and skipped, with ``"fail"`` a `DataError` lists them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict

from rlrt_core.config import DataConfig
from rlrt_core.reward import last_boxed

logger = logging.getLogger(__name__)

Format = Literal["auto", "gsm8k", "math", "generic"]
# Named data sets shipped in the repository's data/ directory.
BUILTIN_DATASETS: dict[str, str] = {
    "gsm8k-train": "gsm8k/gsm8k_train.jsonl",
    "gsm8k-test": "gsm8k/gsm8k_test.jsonl",
}
_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")
_MAX_REPORTED = 20


class Problem(BaseModel):
    """One prompt with its reference answer (and optional worked solution)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    prompt: str
    answer: str
    solution: str | None = None


class BadRow(NamedTuple):
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class DataError(ValueError):
    """A data set that cannot be used; `bad_rows` lists every row at fault (file:line)."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow] = ()) -> None:
        self.bad_rows = list(bad_rows)
        shown = "\n".join(f"  {r}" for r in self.bad_rows[:_MAX_REPORTED])
        more = len(self.bad_rows) - _MAX_REPORTED
        if more > 0:
            shown += f"\n  ... and {more} more"
        super().__init__(message + ("\n" + shown if shown else ""))


# --------------------------------------------------------------------------- locations

def data_dir() -> Path:
    """The directory holding the shipped data sets: $RLRT_DATA_DIR, else the repository's
    data/ (source checkout or editable install), else <prefix>/share/rlrt/data (wheel)."""
    candidates = []
    if os.environ.get("RLRT_DATA_DIR"):
        candidates.append(Path(os.environ["RLRT_DATA_DIR"]))
    candidates.append(Path(__file__).resolve().parents[1] / "data")
    candidates.append(Path(sys.prefix) / "share" / "rlrt" / "data")
    for c in candidates:
        if (c / "gsm8k").is_dir():
            return c
    raise DataError("shipped data directory not found; looked in: " + ", ".join(map(str, candidates)))


def resolve_data_path(path: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None) -> Path:
    """A data file from a built-in name (`gsm8k-train`, `gsm8k-test`), an absolute path, a
    path relative to `base_dir` or the working directory, or `data/...` inside `data_dir()`."""
    s = str(path)
    if s in BUILTIN_DATASETS:
        return data_dir() / BUILTIN_DATASETS[s]
    p = Path(s).expanduser()
    tried = []
    if p.is_absolute():
        tried.append(p)
    else:
        if base_dir is not None:
            tried.append(Path(base_dir) / p)
        tried.append(Path.cwd() / p)
        if p.parts and p.parts[0] == "data":
            try:
                tried.append(data_dir().joinpath(*p.parts[1:]))
            except DataError:
                logger.debug("no shipped data directory to resolve %s against", p)
    for t in tried:
        if t.is_file():
            return t
    names = ", ".join(sorted(BUILTIN_DATASETS))
    raise DataError(f"data file not found: {s} (looked at {', '.join(map(str, tried))}; built-in names: {names})")


# --------------------------------------------------------------------------- row parsers

def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K's `<<48/2=24>>` calculator annotations."""
    return _CALC_ANNOTATION.sub("", text)


def split_gsm8k_answer(text: str) -> tuple[str, str]:
    """GSM8K `answer` field -> (worked solution without annotations, final answer)."""
    if "####" not in text:
        raise ValueError("no '####' final-answer line in 'answer'")
    worked, _, final = text.rpartition("####")
    final = final.strip()
    if not final:
        raise ValueError("empty answer after '####'")
    return strip_calculator_annotations(worked).strip(), final


def _text(row: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    val = row[key]
    if not isinstance(val, str):
        raise ValueError(f"field {key!r} must be a string, got {type(val).__name__}")
    if required and not val.strip():
        raise ValueError(f"field {key!r} is empty")
    return val


def _answer_value(row: Mapping[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"missing field {key!r}")
    val = row[key]
    # Numeric answers are common in generic sets; bool is an int subclass but not an answer.
    if isinstance(val, bool) or not isinstance(val, (str, int, float)):
        raise ValueError(f"field {key!r} must be a string or number, got {type(val).__name__}")
    out = str(val).strip()
    if not out:
        raise ValueError(f"field {key!r} is empty")
    return out


def _row_id(row: Mapping[str, Any], key: str, default: str) -> str:
    val = row.get(key)
    if val is None:
        return default
    if isinstance(val, bool) or not isinstance(val, (str, int)):
        raise ValueError(f"field {key!r} must be a string or integer, got {type(val).__name__}")
    return str(val)


def _parse_gsm8k(row: Mapping[str, Any], default_id: str, fields: Mapping[str, str]) -> Problem:
    question = _text(row, "question")
    solution, answer = split_gsm8k_answer(_text(row, "answer"))  # type: ignore[arg-type]
    return Problem(id=_row_id(row, "id", default_id), prompt=question, answer=answer,  # type: ignore[arg-type]
                   solution=solution or None)


def _parse_math(row: Mapping[str, Any], default_id: str, fields: Mapping[str, str]) -> Problem:
    problem = _text(row, "problem")
    solution = _text(row, "solution", required=False)
    if row.get("answer") is not None:
        answer = _answer_value(row, "answer")
    else:
        if solution is None:
            raise ValueError("missing field 'answer' and no 'solution' to take it from")
        boxed = last_boxed(solution)
        if boxed is None:
            raise ValueError("no 'answer' field and no \\boxed{} in 'solution'")
        answer = boxed
    return Problem(id=_row_id(row, "id", default_id), prompt=problem, answer=answer,  # type: ignore[arg-type]
                   solution=solution or None)


def _parse_generic(row: Mapping[str, Any], default_id: str, fields: Mapping[str, str]) -> Problem:
    prompt = _text(row, fields["prompt"])
    answer = _answer_value(row, fields["answer"])
    solution = _text(row, fields["solution"], required=False)
    return Problem(id=_row_id(row, fields["id"], default_id), prompt=prompt, answer=answer,  # type: ignore[arg-type]
                   solution=solution or None)


_PARSERS = {"gsm8k": _parse_gsm8k, "math": _parse_math, "generic": _parse_generic}
_GENERIC_KEYS = ("id", "prompt", "answer", "solution")


def detect_format(row: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> str:
    """Which JSONL format a row is in ("gsm8k", "math" or "generic")."""
    if field_map:
        return "generic"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if "problem" in row and ("solution" in row or "answer" in row):
        return "math"
    if "prompt" in row and "answer" in row:
        return "generic"
    raise ValueError(f"cannot detect the format from keys {sorted(row)}; expected question/answer (gsm8k), "
                     "problem/solution (math) or prompt/answer (generic), or set data.format and data.field_map")


def _with_instruction(prompt: str, instruction: str | None) -> str:
    return f"{prompt.rstrip()}\n\n{instruction}" if instruction else prompt


def load_jsonl(path: str | os.PathLike[str], *, format: Format = "auto", field_map: Mapping[str, str] | None = None,
               on_bad_row: Literal["skip", "fail"] = "skip", instruction: str | None = None,
               max_problems: int | None = None) -> list[Problem]:
    """Problems from a JSONL file, in file order (first `max_problems` when given).

    Ids default to `<file stem>-<line number>` unless rows carry an `id`. `instruction`, when
    non-empty, is appended to every prompt after a blank line."""
    p = Path(path)
    if format not in ("auto", *_PARSERS):
        raise DataError(f"unknown data format {format!r}; expected auto, gsm8k, math or generic")
    unknown = set(field_map or {}) - set(_GENERIC_KEYS)
    if unknown:
        raise DataError(f"data.field_map has unknown keys {sorted(unknown)}; allowed: {list(_GENERIC_KEYS)}")
    fields = {k: (field_map or {}).get(k, k) for k in _GENERIC_KEYS}
    fmt = None if format == "auto" else format
    problems: list[Problem] = []
    bad: list[BadRow] = []
    seen: dict[str, int] = {}
    try:
        fh = p.open("rb")
    except OSError as err:
        raise DataError(f"cannot read data file {p}: {err.strerror or err}") from None
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            if max_problems is not None and len(problems) >= max_problems:
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                bad.append(BadRow(str(p), line_no, f"not UTF-8: {err.reason}"))
                continue
            except json.JSONDecodeError as err:
                bad.append(BadRow(str(p), line_no, f"not valid JSON: {err.msg} (column {err.colno})"))
                continue
            if not isinstance(row, dict):
                bad.append(BadRow(str(p), line_no, f"expected a JSON object, got {type(row).__name__}"))
                continue
            try:
                if fmt is None:
                    fmt = detect_format(row, field_map)
                    logger.info("%s: detected format %s", p, fmt)
                prob = _PARSERS[fmt](row, f"{p.stem}-{line_no}", fields)
            except ValueError as err:
                bad.append(BadRow(str(p), line_no, str(err)))
                continue
            if prob.id in seen:
                bad.append(BadRow(str(p), line_no, f"duplicate id {prob.id!r} (first on line {seen[prob.id]})"))
                continue
            seen[prob.id] = line_no
            if instruction:
                prob = prob.model_copy(update={"prompt": _with_instruction(prob.prompt, instruction)})
            problems.append(prob)
    if bad and on_bad_row == "fail":
        raise DataError(f"{len(bad)} bad row(s) in {p} (data.on_bad_row = 'fail')", bad)
    for b in bad:
        logger.warning("skipping bad row %s", b)
    if not problems:
        raise DataError(f"no usable problems in {p}", bad)
    return problems


# --------------------------------------------------------------------------- arithmetic

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problems(*, digits: int, ops: Sequence[str], num_problems: int, seed: int,
                        instruction: str | None) -> list[Problem]:
    """`num_problems` problems "What is a op b?" with `digits`-digit operands (1 digit: 0-9),
    ops drawn uniformly from `ops` ("+", "-", "*"); subtraction keeps a >= b so answers are
    non-negative. Deterministic in `seed`; a longer list extends a shorter one."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty list drawn from {sorted(_OPS)}, got {list(ops)}")
    rng = random.Random(seed)
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    ops = list(ops)
    out = []
    for i in range(num_problems):
        op = ops[rng.randrange(len(ops))]
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and b > a:
            a, b = b, a
        c = _OPS[op](a, b)
        prompt = f"What is {a} {op} {b}?" + (f" {instruction}" if instruction else "")
        out.append(Problem(id=f"arith-{digits}d-s{seed}-{i}", prompt=prompt, answer=str(c),
                           solution=f"{a} {op} {b} = {c}"))
    return out


# --------------------------------------------------------------------------- entry point

def load_problems(cfg: DataConfig, *, base_dir: str | os.PathLike[str] | None = None) -> list[Problem]:
    """The problems a run trains on, as configured (`data.source`, `data.path`, ...).

    Relative paths resolve against `base_dir` (e.g. the recipe's directory), then the
    working directory, then the shipped data/ directory. Order is the file's (the
    dispatcher shuffles with `data.shuffle_seed`); `data.max_problems` truncates."""
    if cfg.source == "arithmetic":
        a = cfg.arithmetic
        n = min(a.num_problems, cfg.max_problems) if cfg.max_problems else a.num_problems
        return arithmetic_problems(digits=a.digits, ops=a.ops, num_problems=n, seed=a.seed,
                                   instruction=cfg.instruction)
    path = resolve_data_path(cfg.path, base_dir=base_dir)  # type: ignore[arg-type]
    return load_jsonl(path, format=cfg.format, field_map=cfg.field_map, on_bad_row=cfg.on_bad_row,
                      instruction=cfg.instruction, max_problems=cfg.max_problems)
