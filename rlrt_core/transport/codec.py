"""Protobuf <-> Python conversions for the trajectory messages (rlrt.v1).

Stage helpers build and enrich a `RolloutGroup` as it travels prompts -> rollouts ->
verified -> scored; `group_tensors` turns a finished group into padded tensors for the
learner. Arrays travel as packed numeric fields (token ids, log-probs) or as `Tensor`
messages (raw little-endian bytes + dtype + shape); never Python object serialisation.

The dataclasses of other modules (rlrt_core.engines.Completion / GenerationResult,
rlrt_core.reward.VerifyResult, rlrt_core.data.Problem) are read by attribute, so this
module imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from rlrt_core.proto import trajectory_pb2 as pb

if sys.byteorder != "little":  # raw tensor bytes on the wire are little-endian by definition
    raise ImportError("rlrt_core.transport.codec supports little-endian hosts only")

M = TypeVar("M", bound=Message)

# safetensors dtype names (the wire names) <-> torch dtypes.
DTYPE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_TO_TORCH.items()}

CONTEXT_KINDS: dict[str, int] = {
    "none": pb.CONTEXT_KIND_NONE, "solution": pb.CONTEXT_KIND_SOLUTION, "peer": pb.CONTEXT_KIND_PEER,
}
CONTEXT_KIND_NAMES: dict[int, str] = {v: k for k, v in CONTEXT_KINDS.items()}


class MalformedMessage(ValueError):
    """A stream entry that cannot be used: undecodable bytes or inconsistent contents."""


# Upper bound on completions per group, whatever the recipe (config allows up to this too).
MAX_SAMPLES = 1024
# A log-probability is <= 0; allow float rounding of engines and scorers.
_LOGPROB_TOL = 1e-3


@dataclass(frozen=True)
class Limits:
    """What a stage knows about valid values beyond a message's own consistency; None skips
    a check. vocab_size: token ids must be < it; max_model_len: prompt + completion tokens
    must fit; max_samples: completions per group; max_version: newest weight version that can
    exist (the learner's own version, at the learner)."""

    vocab_size: int | None = None
    max_model_len: int | None = None
    max_samples: int = MAX_SAMPLES
    max_version: int | None = None


def _finite(values: Any, what: str, *, upper: float | None = None, lower: float | None = None) -> None:
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return
    if not np.isfinite(a).all():
        raise MalformedMessage(f"{what}: {int((~np.isfinite(a)).sum())} non-finite value(s)")
    if upper is not None and a.max() > upper:
        raise MalformedMessage(f"{what}: value {a.max():.4g} above {upper}")
    if lower is not None and a.min() < lower:
        raise MalformedMessage(f"{what}: value {a.min():.4g} below {lower}")


def _token_ids(ids: Any, what: str, vocab_size: int | None) -> None:
    if not len(ids):
        return
    lo, hi = min(ids), max(ids)
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise MalformedMessage(f"{what}: token id {bad} outside the vocabulary [0, {vocab_size})")


def _token_versions(versions: Any, n_tokens: int, msg: Any, lim: Limits, where: str) -> None:
    """Per-token weight versions: none, or one per token, non-decreasing, within
    [group version, newest version]."""
    n = len(versions)
    if n == 0:
        return
    if n != n_tokens:
        raise MalformedMessage(f"{where}: {n} token versions for {n_tokens} tokens")
    lo, hi = min(versions), max(versions)
    if lo < msg.min_version:
        raise MalformedMessage(f"{where}: token version {lo} < the group's min_version {msg.min_version}")
    if lo < msg.version:
        raise MalformedMessage(f"{where}: token version {lo} older than the group's version {msg.version}")
    if lim.max_version is not None and hi > lim.max_version:
        raise MalformedMessage(f"{where}: token version {hi} ahead of the newest version {lim.max_version}")
    if any(b < a for a, b in zip(versions, versions[1:])):
        raise MalformedMessage(f"{where}: token versions decrease (weights only move forward during a rollout)")


# ---------------------------------------------------------------------------------------
# Bytes <-> messages


def encode(msg: Message) -> bytes:
    """Serialise a message for a stream entry."""
    return msg.SerializeToString()


def decode(data: bytes | None, cls: type[M], *, validate_fields: bool = True, limits: Limits | None = None) -> M:
    """Parse `data` as `cls` and (by default) check its invariants (and `limits`); raise
    `MalformedMessage` naming the problem instead of returning a half-valid message."""
    if data is None:
        raise MalformedMessage(f"entry has no 'data' field (expected {cls.DESCRIPTOR.full_name})")
    try:
        msg = cls.FromString(bytes(data))
    except (DecodeError, ValueError, TypeError) as err:
        raise MalformedMessage(f"cannot decode {cls.DESCRIPTOR.full_name} ({len(data)} bytes): {err}") from None
    if validate_fields:
        validate(msg, limits)
    return msg


def validate(msg: Message, limits: Limits | None = None) -> None:
    """Check every field later stages rely on; raise `MalformedMessage` naming the first
    problem. Called once per entry where it enters a stage (`StreamBus.consume_messages`),
    so a bad entry is dead-lettered alone and its batch-mates proceed."""
    lim = limits or Limits()
    name = msg.DESCRIPTOR.full_name
    if isinstance(msg, (pb.PromptTask, pb.RolloutGroup)):
        if not msg.group_id:
            raise MalformedMessage(f"{name} has an empty group_id")
        if not msg.run_id:
            raise MalformedMessage(f"{name} {msg.group_id!r} has an empty run_id")
        if msg.min_version < 0:
            raise MalformedMessage(f"{name} {msg.group_id!r} has min_version {msg.min_version} < 0")
        if lim.max_version is not None and msg.min_version > lim.max_version:
            raise MalformedMessage(f"{name} {msg.group_id!r} has min_version {msg.min_version}, ahead of the "
                                   f"newest weight version {lim.max_version}")
    if isinstance(msg, pb.PromptTask):
        if not 1 <= msg.n_samples <= lim.max_samples:
            raise MalformedMessage(f"PromptTask {msg.group_id!r} asks for n_samples={msg.n_samples} "
                                   f"(allowed 1..{lim.max_samples})")
        if not msg.problem.prompt:
            raise MalformedMessage(f"PromptTask {msg.group_id!r} has an empty problem.prompt")
    if isinstance(msg, pb.RolloutGroup):
        g = repr(msg.group_id)
        k = len(msg.completions)
        if k == 0:
            raise MalformedMessage(f"RolloutGroup {g} has no completions")
        if k > lim.max_samples:
            raise MalformedMessage(f"RolloutGroup {g} has {k} completions (allowed 1..{lim.max_samples})")
        if msg.version < 0:
            raise MalformedMessage(f"RolloutGroup {g} has weight version {msg.version} < 0")
        if msg.version < msg.min_version:
            raise MalformedMessage(f"RolloutGroup {g} was generated with version {msg.version} < its "
                                   f"min_version {msg.min_version}")
        if lim.max_version is not None and msg.version > lim.max_version:
            raise MalformedMessage(f"RolloutGroup {g} claims weight version {msg.version}, ahead of the newest "
                                   f"version {lim.max_version}")
        if not len(msg.prompt_ids):
            raise MalformedMessage(f"RolloutGroup {g} has no prompt_ids")
        _token_ids(msg.prompt_ids, f"RolloutGroup {g} prompt_ids", lim.vocab_size)
        for i, c in enumerate(msg.completions):
            where = f"RolloutGroup {g} completion {i}"
            if not len(c.token_ids):
                raise MalformedMessage(f"{where} has no tokens")
            if len(c.logprobs) != len(c.token_ids):
                raise MalformedMessage(f"{where}: {len(c.logprobs)} log-probs for {len(c.token_ids)} tokens")
            _token_ids(c.token_ids, where, lim.vocab_size)
            if lim.max_model_len is not None and len(msg.prompt_ids) + len(c.token_ids) > lim.max_model_len:
                raise MalformedMessage(f"{where}: prompt + completion = {len(msg.prompt_ids) + len(c.token_ids)} "
                                       f"tokens exceed model.max_model_len ({lim.max_model_len})")
            _finite(c.logprobs, f"{where} behaviour log-probs", upper=_LOGPROB_TOL)
            _token_versions(c.token_versions, len(c.token_ids), msg, lim, where)
        versioned = [c.token_versions for c in msg.completions if len(c.token_versions)]
        if len(versioned) == k and min(min(v) for v in versioned) != msg.version:
            # the learner's staleness filter reads msg.version: it must be the oldest token's
            raise MalformedMessage(f"RolloutGroup {g} has version {msg.version}, but its oldest token was generated "
                                   f"by version {min(min(v) for v in versioned)}")
        for field, n in (("verifier_results", len(msg.verifier_results)), ("teacher_scores", len(msg.teacher_scores))):
            if n not in (0, k):
                raise MalformedMessage(f"RolloutGroup {g} has {n} {field} for {k} completions")
        _finite([v.reward for v in msg.verifier_results], f"RolloutGroup {g} rewards")
        for i, s in enumerate(msg.teacher_scores):
            t = len(msg.completions[i].token_ids)
            # An empty score is a rollout the method does not reweight (weight 1).
            scored = len(s.student_logprobs) or len(s.teacher_logprobs)
            if scored and (len(s.student_logprobs) != t or len(s.teacher_logprobs) != t):
                raise MalformedMessage(f"RolloutGroup {g} teacher score {i}: "
                                       f"{len(s.student_logprobs)}/{len(s.teacher_logprobs)} log-probs for {t} tokens")
            _finite(s.student_logprobs, f"RolloutGroup {g} teacher score {i} student log-probs", upper=_LOGPROB_TOL)
            _finite(s.teacher_logprobs, f"RolloutGroup {g} teacher score {i} teacher log-probs", upper=_LOGPROB_TOL)
            if len(s.position_kl) not in (0, t):
                raise MalformedMessage(f"RolloutGroup {g} teacher score {i}: {len(s.position_kl)} D̄_t values "
                                       f"for {t} tokens")
            _finite(s.position_kl, f"RolloutGroup {g} teacher score {i} D̄_t", lower=-_LOGPROB_TOL)


# ---------------------------------------------------------------------------------------
# Tensors


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (row-major); no copy when already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `tensor_bytes`: a tensor of safetensors `dtype` and `shape` over a private
    copy of `data` (a bytearray is used in place)."""
    if dtype not in DTYPE_TO_TORCH:
        raise MalformedMessage(f"unknown tensor dtype {dtype!r}; expected one of {sorted(DTYPE_TO_TORCH)}")
    tdt = DTYPE_TO_TORCH[dtype]
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        if s < 0:
            raise MalformedMessage(f"negative dimension in tensor shape {shape}")
        numel *= s
    expected = numel * tdt.itemsize
    if len(data) != expected:
        raise MalformedMessage(f"tensor {dtype}{list(shape)} needs {expected} bytes, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=tdt)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=tdt).reshape(shape)


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Any CPU/GPU tensor -> `Tensor{dtype, shape, data}`."""
    if t.dtype not in TORCH_TO_DTYPE:
        raise ValueError(f"tensor dtype {t.dtype} has no wire name")
    return pb.Tensor(dtype=TORCH_TO_DTYPE[t.dtype], shape=list(t.shape), data=bytes(tensor_bytes(t)))


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    """`Tensor` message -> writable torch tensor (own memory)."""
    return tensor_from_bytes(msg.data, msg.dtype, msg.shape)


class VersionHasher:
    """Checksum of a weight version: sha256 over, per tensor in order, its name, dtype, shape
    and byte length (a fixed header), then its bytes. Fed incrementally so neither side
    needs the whole version in one buffer."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def begin_tensor(self, name: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        head = json.dumps([name, dtype, [int(s) for s in shape]], separators=(",", ":")).encode()
        self._h.update(struct.pack("<QQ", len(head), nbytes))
        self._h.update(head)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# ---------------------------------------------------------------------------------------
# Messages from the dataclasses of other modules (read by attribute or key)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    if hasattr(values, "tolist"):  # numpy
        return values.tolist()
    return list(values)


def problem_to_proto(problem: Any) -> pb.Problem:
    """`rlrt_core.data.Problem` (or a mapping with id/prompt/answer/solution) -> `Problem`."""
    msg = pb.Problem(id=str(_get(problem, "id", "")), prompt=str(_get(problem, "prompt", "")),
                     answer=str(_get(problem, "answer", "")))
    solution = _get(problem, "solution")
    if solution is not None:
        msg.solution = str(solution)
    return msg


def completion_to_proto(completion: Any) -> pb.Completion:
    """`rlrt_core.engines.Completion` (token_ids, logprobs, finish_reason, text) -> `Completion`."""
    msg = pb.Completion(finish_reason=str(_get(completion, "finish_reason", "")), text=str(_get(completion, "text", "")))
    msg.token_ids.extend(_as_list(_get(completion, "token_ids", [])))
    msg.logprobs.extend(_as_list(_get(completion, "logprobs", [])))
    msg.token_versions.extend(_as_list(_get(completion, "token_versions", None) or []))
    return msg


def prompt_task(group_id: str, run_id: str, problem: Any, *, n_samples: int, min_version: int,
                dispatched_at: float | None = None) -> pb.PromptTask:
    """The learner's dispatch message for one group of `n_samples` completions."""
    return pb.PromptTask(group_id=group_id, run_id=run_id, problem=problem_to_proto(problem), n_samples=n_samples,
                         min_version=min_version, dispatched_at=time.time() if dispatched_at is None else dispatched_at)


def rollout_group(task: pb.PromptTask, result: Any, *, engine: str, worker_id: str, generation_s: float = 0.0,
                  generated_at: float | None = None) -> pb.RolloutGroup:
    """A rollout worker's output: `result` is an `rlrt_core.engines.GenerationResult`
    (prompt_ids, completions, version) for `task`. With per-token versions the group's
    version is its oldest token's (what the learner's staleness filter must see)."""
    version = int(_get(result, "version"))
    token_versions = [v for c in _get(result, "completions") for v in (_get(c, "token_versions", None) or [])]
    if token_versions:
        version = min(token_versions)
    if version < task.min_version:
        raise ValueError(f"group {task.group_id!r} generated with weight version {version} "
                         f"< min_version {task.min_version}: load newer weights first")
    g = pb.RolloutGroup(group_id=task.group_id, run_id=task.run_id, problem=task.problem, version=version,
                        engine=engine, worker_id=worker_id, min_version=task.min_version)
    g.prompt_ids.extend(_as_list(_get(result, "prompt_ids")))
    for c in _get(result, "completions"):
        g.completions.append(completion_to_proto(c))
    g.timestamps.dispatched_at = task.dispatched_at
    g.timestamps.generated_at = time.time() if generated_at is None else generated_at
    g.timestamps.generation_s = generation_s
    return g


def set_verifier_results(group: pb.RolloutGroup, results: Sequence[Any]) -> None:
    """Fill one `VerifierResult` per completion from `rlrt_core.reward.VerifyResult`s (in place)."""
    if len(results) != len(group.completions):
        raise ValueError(f"group {group.group_id!r}: {len(results)} verifier results for {len(group.completions)} completions")
    del group.verifier_results[:]
    for r in results:
        v = group.verifier_results.add(reward=float(_get(r, "reward")), timed_out=bool(_get(r, "timed_out", False)))
        if _get(r, "extracted") is not None:
            v.extracted = str(_get(r, "extracted"))
        if _get(r, "reason") is not None:
            v.reason = str(_get(r, "reason"))
    group.timestamps.verified_at = time.time()


def _row(t: torch.Tensor | None, i: int, n: int) -> list:
    return [] if t is None else t[i, :n].detach().cpu().tolist()


def set_teacher_scores(group: pb.RolloutGroup, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                       teacher_version: int, context_kinds: Sequence[str], peer_indices: Sequence[int] | None = None,
                       position_kl: torch.Tensor | None = None,
                       student_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                       teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Fill one `TeacherScore` per completion (in place).

    student_logprobs, teacher_logprobs: [K, T] right-padded (as `ScoreResult.logprobs`);
    row i is cut to completion i's length. position_kl: [K, T] D̄_t or None.
    student_topk / teacher_topk: (ids [K, T, k], log-probs [K, T, k]) or None.
    context_kinds: "none" | "solution" | "peer" per completion.
    """
    k = len(group.completions)
    if student_logprobs.shape[0] != k or teacher_logprobs.shape[0] != k or len(context_kinds) != k:
        raise ValueError(f"group {group.group_id!r}: scores for {student_logprobs.shape[0]}/{teacher_logprobs.shape[0]} "
                         f"rows and {len(context_kinds)} context kinds, but {k} completions")
    del group.teacher_scores[:]
    for i, c in enumerate(group.completions):
        n = len(c.token_ids)
        if student_logprobs.shape[1] < n or teacher_logprobs.shape[1] < n:
            raise ValueError(f"group {group.group_id!r} completion {i}: {n} tokens but scores have "
                             f"{student_logprobs.shape[1]}/{teacher_logprobs.shape[1]} columns")
        kind = context_kinds[i]
        if kind not in CONTEXT_KINDS:
            raise ValueError(f"unknown context kind {kind!r}; expected one of {sorted(CONTEXT_KINDS)}")
        s = group.teacher_scores.add(teacher_version=teacher_version, context_kind=CONTEXT_KINDS[kind],
                                     peer_index=-1 if peer_indices is None else int(peer_indices[i]))
        s.student_logprobs.extend(_row(student_logprobs, i, n))
        s.teacher_logprobs.extend(_row(teacher_logprobs, i, n))
        if position_kl is not None:
            row = position_kl[i, :n].detach().float().cpu()
            s.position_kl.extend(row.tolist())
            if n:
                s.position_kl_mean = float(row.mean())
                s.position_kl_max = float(row.max())
        for topk, ids_field, lp_field in ((student_topk, "student_topk_ids", "student_topk_logprobs"),
                                          (teacher_topk, "teacher_topk_ids", "teacher_topk_logprobs")):
            if topk is not None:
                getattr(s, ids_field).CopyFrom(tensor_to_proto(topk[0][i, :n]))
                getattr(s, lp_field).CopyFrom(tensor_to_proto(topk[1][i, :n]))
    group.timestamps.scored_at = time.time()


# ---------------------------------------------------------------------------------------
# Learner view


@dataclass
class GroupTensors:
    """One group as padded tensors (K completions, T = longest completion; padding is 0
    and masked out)."""

    group_id: str
    version: int
    prompt_ids: torch.Tensor                   # LongTensor [P]
    response_ids: torch.Tensor                 # LongTensor [K, T]
    mask: torch.Tensor                         # BoolTensor [K, T]
    behavior_logprobs: torch.Tensor            # FloatTensor [K, T]
    rewards: torch.Tensor | None               # FloatTensor [K]; None before the verifier
    student_logprobs: torch.Tensor | None      # FloatTensor [K, T]; None before the teacher
    teacher_logprobs: torch.Tensor | None      # FloatTensor [K, T]
    context_kinds: list[str]                   # per completion; [] before the teacher


def group_tensors(group: pb.RolloutGroup) -> GroupTensors:
    """Padded tensors of a (verified and possibly scored) group for the learner."""
    k = len(group.completions)
    lengths = [len(c.token_ids) for c in group.completions]
    t = max(lengths, default=0)
    ids = torch.zeros(k, t, dtype=torch.long)
    mask = torch.zeros(k, t, dtype=torch.bool)
    behaviour = torch.zeros(k, t)
    scored = len(group.teacher_scores) == k and k > 0
    student = torch.zeros(k, t) if scored else None
    teacher = torch.zeros(k, t) if scored else None
    for i, (c, n) in enumerate(zip(group.completions, lengths)):
        if n == 0:
            continue
        ids[i, :n] = torch.tensor(list(c.token_ids), dtype=torch.long)
        mask[i, :n] = True
        if len(c.logprobs):
            behaviour[i, :n] = torch.tensor(list(c.logprobs))
        if scored:
            student[i, :n] = torch.tensor(list(group.teacher_scores[i].student_logprobs))
            teacher[i, :n] = torch.tensor(list(group.teacher_scores[i].teacher_logprobs))
    rewards = None
    if len(group.verifier_results) == k and k > 0:
        rewards = torch.tensor([v.reward for v in group.verifier_results])
    kinds = [CONTEXT_KIND_NAMES.get(s.context_kind, "none") for s in group.teacher_scores] if scored else []
    return GroupTensors(group_id=group.group_id, version=group.version,
                        prompt_ids=torch.tensor(list(group.prompt_ids), dtype=torch.long), response_ids=ids,
                        mask=mask, behavior_logprobs=behaviour, rewards=rewards, student_logprobs=student,
                        teacher_logprobs=teacher, context_kinds=kinds)
