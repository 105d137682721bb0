"""Run samples: a bounded record of scored rollouts, written by the learner during training and
read by the run explorer (`rlrt explore RUN_DIR`, the learner's `/explore` page).

Every `metrics.sample_every` learner steps (0 = off) the learner writes
`RUN_DIR/samples/step_NNNNNN.json` (atomically: a temporary file, then a rename) holding

    rollouts     up to `metrics.sample_rollouts` rollouts of the step's batch (whole groups, those
                 the teacher scored first, else in batch order; the last one cut at the bound):
                 prompt, group id, the weight version
                 that generated it, reward, token ids and their text pieces, and per response token
                 d_hat       D̂_t = log P_S(y_t) - log P_T(y_t) (eq. 3), exact: the teacher scorer's
                             log-probs of the sampled token under both views
                 d_bar_topk  D̄_t = KL(P_S || P_T) as the teacher scorer estimates it from both
                             views' top-k rows (k = teacher.topk; `algorithms.position_asymmetry_topk`)
                 each key present only where the teacher scored that rollout (and, for d_bar_topk,
                 where teacher.topk > 0); the full-vocabulary D̄_t never reaches the learner
    histograms   per value, over every token of the step's whole batch that has it
    version      the weight version published after the step (as in metrics.jsonl)

Only the newest `metrics.sample_keep` files are kept. Readers never trust a file: `read_step`
validates it and raises `SampleError` with the reason; `list_steps` skips bad files and reports
them. Values that are not finite are written as null.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
SAMPLES_DIR = "samples"
HIST_BINS = 40
_NAME = re.compile(r"^step_(\d{6,})\.json$")

# Per-token values a sample may carry, with what they are (shown by the explorer).
VALUES: dict[str, str] = {
    "d_hat": "D̂_t = log P_S(y_t) − log P_T(y_t) (eq. 3): the sampled token's log-prob under the student "
             "view minus under the teacher view, exact (teacher scorer). > 0: the student chose against "
             "the teacher (explore); < 0: the teacher would have predicted it (exploit).",
    "d_bar_topk": "D̄_t = KL(P_S ‖ P_T) per position, estimated by the teacher scorer from both views' top-k "
                  "rows (k = teacher.topk; rlrt_core.algorithms.position_asymmetry_topk). Not the "
                  "full-vocabulary KL: only the top-k estimate reaches the learner.",
}

__all__ = ["FORMAT", "SAMPLES_DIR", "VALUES", "SampleError", "SampleNotFound", "SampleSource", "SampleWriter",
           "StepReader", "build_step_sample", "histogram", "list_steps", "read_step", "sample_path",
           "sample_source", "summary", "validate_step"]


class SampleError(ValueError):
    """A sample file that cannot be used; the message says why."""


class SampleNotFound(LookupError):
    """No sample file for the step asked for."""


@dataclass
class SampleSource:
    """What the learner keeps of a scored group besides its `TrainGroup` (which drops it).

    prompt / problem_id: the problem's prompt text and id.
    d_bar_topk: per completion, [n] float32 D̄_t top-k estimates from the teacher scorer, or None.
    finish_reasons / context_kinds: per completion ("stop" | "length"; the TeacherScore's context kind
        name or "" where the teacher did not score it)."""

    prompt: str
    problem_id: str
    d_bar_topk: list[array | None]
    finish_reasons: list[str]
    context_kinds: list[str] = field(default_factory=list)


def sample_source(g: Any) -> SampleSource:
    """A scored `RolloutGroup` (protobuf) -> its `SampleSource` (4 bytes per D̄_t value)."""
    d_bar: list[array | None] = []
    kinds: list[str] = []
    for i, c in enumerate(g.completions):
        sc = g.teacher_scores[i] if i < len(g.teacher_scores) else None
        n = len(c.token_ids)
        d_bar.append(array("f", sc.position_kl) if sc is not None and n and len(sc.position_kl) == n else None)
        kinds.append(_context_kind(sc) if sc is not None and len(sc.student_logprobs) == n and n else "")
    return SampleSource(prompt=g.problem.prompt, problem_id=g.problem.id, d_bar_topk=d_bar,
                        finish_reasons=[c.finish_reason for c in g.completions], context_kinds=kinds)


def _context_kind(sc: Any) -> str:
    from rlrt_core.proto import trajectory_pb2 as pb

    name = pb.ContextKind.Name(sc.context_kind) if sc.context_kind in pb.ContextKind.values() else ""
    return name.removeprefix("CONTEXT_KIND_").lower()


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def histogram(values: Iterable[float] | np.ndarray, bins: int = HIST_BINS) -> dict[str, Any] | None:
    """Counts of finite `values` in `bins` equal bins over [min, max] (widened by 0.5 each side
    when all are equal), with n, mean, min, max and `scale`, the 95th percentile of |value| (where
    the explorer's shading saturates, so one outlier does not wash out the rest); None when there
    is no finite value."""
    v = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    a, b = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    counts, edges = np.histogram(v, bins=bins, range=(a, b))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n": int(v.size),
            "mean": float(v.mean()), "min": lo, "max": hi, "scale": float(np.quantile(np.abs(v), 0.95))}


def _d_hat(sample: Any) -> np.ndarray | None:
    """[n] float64 D̂_t of a scored sample, or None."""
    s, t = sample.student_logprobs, sample.teacher_logprobs
    if s is None or t is None or len(s) != len(sample.response_ids) or len(t) != len(s):
        return None
    with np.errstate(invalid="ignore"):  # -inf - -inf: NaN, written as null
        return np.asarray(s, dtype=np.float64) - np.asarray(t, dtype=np.float64)


def build_step_sample(step: int, version: int, method: str, groups: Sequence[Any],
                      sources: Mapping[str, SampleSource], *, max_rollouts: int,
                      decode: Callable[[list[int]], list[str]] | None = None, topk: int | None = None,
                      bins: int = HIST_BINS) -> dict[str, Any]:
    """The sample document of one learner step.

    Args:
        step, version: the step and the weight version published after it.
        method: `algorithm.method`.
        groups: the step's `TrainGroup`s, in batch order.
        sources: group id -> `SampleSource` (groups without one get no prompt and no D̄_t).
        max_rollouts: bound on the rollouts recorded: whole groups, those with teacher scores
            first, otherwise in batch order; the last one cut at the bound.
        decode: token ids -> one text piece per id (None: pieces are not recorded).
        topk: teacher.topk, recorded with D̄_t (what its estimate is computed from).
    Returns:
        A JSON-serialisable dict (see the module docstring); non-finite values are None.
    """
    rollouts: list[dict[str, Any]] = []
    # Whole-batch values as arrays: a paper-scale batch has millions of tokens.
    all_hat: list[np.ndarray] = []
    all_bar: list[np.ndarray] = []
    # Groups the teacher scored first (stable): the sample is there to show per-token values.
    ordered = sorted(groups, key=lambda g: not any(s.teacher_logprobs is not None for s in g.samples))
    for g in ordered:
        src = sources.get(g.group_id)
        for i, s in enumerate(g.samples):
            d_hat = _d_hat(s)
            d_bar = None
            if src is not None and i < len(src.d_bar_topk) and src.d_bar_topk[i] is not None \
                    and len(src.d_bar_topk[i]) == len(s.response_ids):
                d_bar = np.frombuffer(src.d_bar_topk[i], dtype=np.float32).astype(np.float64)
            if d_hat is not None:
                all_hat.append(d_hat)
            if d_bar is not None:
                all_bar.append(d_bar)
            if len(rollouts) >= max_rollouts:
                continue
            ids = [int(x) for x in s.response_ids]
            r: dict[str, Any] = {"group_id": g.group_id, "index": i, "version": int(g.version),
                                 "reward": _num(s.reward), "prompt": src.prompt if src else None,
                                 "problem_id": src.problem_id if src else None,
                                 "finish_reason": (src.finish_reasons[i]
                                                   if src and i < len(src.finish_reasons) else None),
                                 "token_ids": ids}
            if src is not None and i < len(src.context_kinds) and src.context_kinds[i]:
                r["context"] = src.context_kinds[i]
            if decode is not None:
                r["tokens"] = list(decode(ids)) if ids else []
            if d_hat is not None:
                r["d_hat"] = [_num(x) for x in d_hat.tolist()]
            if d_bar is not None:
                r["d_bar_topk"] = [_num(x) for x in d_bar.tolist()]
            rollouts.append(r)
    hists = {k: h for k, parts in (("d_hat", all_hat), ("d_bar_topk", all_bar))
             if parts and (h := histogram(np.concatenate(parts), bins)) is not None}
    return {"format": FORMAT, "step": int(step), "version": int(version), "method": method, "time": time.time(),
            "groups": len(groups), "rollouts_total": sum(len(g.samples) for g in groups),
            "topk": topk, "values": {k: VALUES[k] for k in hists}, "histograms": hists, "rollouts": rollouts}


def sample_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step_{int(step):06d}.json"


def _sample_files(samples_dir: Path) -> list[tuple[int, Path]]:
    if not samples_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in samples_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(out)


class SampleWriter:
    """Writes the learner's step samples under `run_dir/samples` (see the module docstring).

    every: steps between samples (0 = never); keep: files kept (oldest deleted first)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, every: int, max_rollouts: int, keep: int) -> None:
        if every < 0 or max_rollouts < 1 or keep < 1:
            raise ValueError(f"SampleWriter: every={every} (>= 0), max_rollouts={max_rollouts} (>= 1), "
                             f"keep={keep} (>= 1)")
        self.dir = Path(run_dir) / SAMPLES_DIR
        self.every, self.max_rollouts, self.keep = every, max_rollouts, keep

    def due(self, step: int) -> bool:
        """Whether learner step `step` (1-based) is sampled."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def write(self, doc: Mapping[str, Any]) -> Path:
        """Write `doc` (from `build_step_sample`) atomically as step_NNNNNN.json, then delete
        the oldest files beyond `keep`. Returns the file's path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = sample_path(self.dir.parent, int(doc["step"]))
        data = json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dir)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the samples from a reader run as another user
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._prune()
        return path

    def _prune(self) -> None:
        files = _sample_files(self.dir)
        for _, p in files[:max(0, len(files) - self.keep)]:
            p.unlink(missing_ok=True)
        for p in self.dir.glob(".step_*.tmp"):  # left by a process killed mid-write
            if time.time() - p.stat().st_mtime > 60:
                p.unlink(missing_ok=True)

    def drop_after(self, step: int) -> int:
        """Delete samples of steps after `step` (a resumed learner re-trains them); how many."""
        n = 0
        for s, p in _sample_files(self.dir):
            if s > step:
                p.unlink(missing_ok=True)
                n += 1
        return n


# -- reading ---------------------------------------------------------------------------------


def _check_list(r: dict, key: str, n: int, kind: type | tuple[type, ...], where: str, *, nullable: bool) -> None:
    v = r[key]
    if not isinstance(v, list) or len(v) != n:
        raise SampleError(f"{where}.{key}: expected a list of {n} values")
    for x in v:
        if x is None and nullable:
            continue
        if isinstance(x, bool) or not isinstance(x, kind):
            raise SampleError(f"{where}.{key}: holds {type(x).__name__} {x!r}")


def validate_step(doc: Any) -> dict[str, Any]:
    """Check a parsed sample document; returns it, or raises `SampleError` naming the field."""
    if not isinstance(doc, dict):
        raise SampleError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise SampleError(f"format {doc.get('format')!r}, expected {FORMAT}")
    for key in ("step", "version"):
        if isinstance(doc.get(key), bool) or not isinstance(doc.get(key), int) or doc[key] < 0:
            raise SampleError(f"{key}: expected an integer >= 0, got {doc.get(key)!r}")
    rollouts = doc.get("rollouts")
    if not isinstance(rollouts, list):
        raise SampleError("rollouts: expected a list")
    hists = doc.get("histograms", {})
    if not isinstance(hists, dict):
        raise SampleError("histograms: expected an object")
    for name, h in hists.items():
        if not (isinstance(h, dict) and isinstance(h.get("edges"), list) and isinstance(h.get("counts"), list)
                and len(h["edges"]) == len(h["counts"]) + 1
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in h["edges"] + h["counts"])):
            raise SampleError(f"histograms.{name}: expected edges (n+1 numbers) and counts (n numbers)")
    for j, r in enumerate(rollouts):
        where = f"rollouts[{j}]"
        if not isinstance(r, dict):
            raise SampleError(f"{where}: expected an object")
        ids = r.get("token_ids")
        if not isinstance(ids, list):
            raise SampleError(f"{where}.token_ids: expected a list")
        n = len(ids)
        _check_list(r, "token_ids", n, int, where, nullable=False)
        if "tokens" in r:
            _check_list(r, "tokens", n, str, where, nullable=False)
        for key in VALUES:
            if key in r:
                _check_list(r, key, n, (int, float), where, nullable=True)
        if r.get("reward") is not None and (isinstance(r["reward"], bool) or not isinstance(r["reward"], (int, float))):
            raise SampleError(f"{where}.reward: expected a number")
    return doc


def read_step(samples_dir: str | os.PathLike[str], step: int) -> dict[str, Any]:
    """The validated sample of `step`; `SampleNotFound` when there is none, `SampleError` when
    its file cannot be used."""
    path = Path(samples_dir) / f"step_{int(step):06d}.json"
    if not path.is_file():
        raise SampleNotFound(f"no sample for step {step} in {samples_dir}")
    return _load(path, int(step))


def _load(path: Path, step: int) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(f"{path.name}: unreadable ({type(err).__name__}: {err})") from None
    try:
        doc = validate_step(doc)
    except SampleError as err:
        raise SampleError(f"{path.name}: {err}") from None
    if doc["step"] != step:
        raise SampleError(f"{path.name}: holds step {doc['step']}")
    return doc


def summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What the explorer's step list shows of one sample."""
    rewards = [r["reward"] for r in doc["rollouts"] if isinstance(r.get("reward"), (int, float))]
    means = {k: h.get("mean") for k, h in doc.get("histograms", {}).items()}
    return {"step": doc["step"], "version": doc["version"], "method": doc.get("method"), "time": doc.get("time"),
            "rollouts": len(doc["rollouts"]), "reward_mean": sum(rewards) / len(rewards) if rewards else None,
            "means": means}


class StepReader:
    """Lists a run's samples, re-reading only files that changed (a listing may be polled)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir) / SAMPLES_DIR
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any] | str]] = {}
        self._lock = threading.Lock()  # a web server may list from several threads

    def list(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """(summaries of the good files by step, [{"file", "reason"}] for files that were skipped)."""
        with self._lock:
            return self._list()

    def _list(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        good, bad = [], []
        seen = set()
        for step, p in _sample_files(self.dir):
            try:
                st = p.stat()
            except OSError:  # deleted by the writer's pruning meanwhile
                continue
            key = (st.st_mtime_ns, st.st_size)
            seen.add(p.name)
            hit = self._cache.get(p.name)
            if hit is None or hit[0] != key:
                try:
                    hit = (key, summary(_load(p, step)))
                except SampleError as err:
                    hit = (key, str(err))
                self._cache[p.name] = hit
            if isinstance(hit[1], str):
                bad.append({"file": p.name, "reason": hit[1]})
            else:
                good.append(hit[1])
        for name in set(self._cache) - seen:
            del self._cache[name]
        return good, bad

    def read(self, step: int) -> dict[str, Any]:
        return read_step(self.dir, step)


def list_steps(run_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """`StepReader(run_dir).list()` once."""
    return StepReader(run_dir).list()
