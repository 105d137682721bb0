"""Protobuf <-> Python conversions for the trajectory messages (rlrt.v1).

Stage helpers build and enrich a `RolloutGroup` as it travels prompts -> rollouts ->
verified -> scored (`prompt_task`, `rollout_group`, `set_verifier_results`,
`set_rollout_scores`); `rlrt_core.learner.train_group` reads a finished one. `validate`
checks every field once where an entry enters a stage. Arrays travel as packed numeric fields (token ids, log-probs) or as `Tensor`
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
from functools import cache
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeVar

from google.protobuf.message import DecodeError, Message

from rlrt_core.proto import trajectory_pb2 as pb

if TYPE_CHECKING:  # torch is imported on first use: the verifier and the launcher decode and
    import torch  # encode messages without tensors and must not load it (~250 MB per process)

if sys.byteorder != "little":  # raw tensor bytes on the wire are little-endian by definition
    raise ImportError("rlrt_core.transport.codec supports little-endian hosts only")

M = TypeVar("M", bound=Message)

@cache
def _dtype_maps() -> tuple[dict[str, "torch.dtype"], dict["torch.dtype", str]]:
    """safetensors dtype names (the wire names) <-> torch dtypes, built on first use."""
    import torch

    to_torch = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }
    return to_torch, {v: k for k, v in to_torch.items()}


def __getattr__(name: str) -> Any:
    """`DTYPE_TO_TORCH` / `TORCH_TO_DTYPE` as module attributes, built when first read."""
    if name == "DTYPE_TO_TORCH":
        return _dtype_maps()[0]
    if name == "TORCH_TO_DTYPE":
        return _dtype_maps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CONTEXT_KINDS: dict[str, int] = {
    "none": pb.CONTEXT_KIND_NONE, "solution": pb.CONTEXT_KIND_SOLUTION, "peer": pb.CONTEXT_KIND_PEER,
}


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
            _validate_support(msg.group_id, i, s, t, lim)


def _validate_support(group_id: str, i: int, s: pb.TeacherScore, t: int, lim: Limits) -> None:
    """Distillation rows of one score: both or neither, [t, k] each, integer ids inside the
    vocabulary (when `lim` knows it) and finite log-probs <= 0; teacher_entropy empty or t
    finite values >= 0."""
    where = f"RolloutGroup {group_id!r} teacher score {i}"
    if len(s.teacher_entropy) not in (0, t):
        raise MalformedMessage(f"{where}: {len(s.teacher_entropy)} teacher entropies for {t} tokens")
    _finite(s.teacher_entropy, f"{where} teacher entropy", lower=-_LOGPROB_TOL)
    has_ids, has_lp = s.HasField("support_ids"), s.HasField("teacher_support_logprobs")
    if not (has_ids or has_lp):
        return
    if has_ids != has_lp:
        raise MalformedMessage(f"{where}: support_ids and teacher_support_logprobs must come together")
    ids, lp = s.support_ids, s.teacher_support_logprobs
    for name, msg in (("support_ids", ids), ("teacher_support_logprobs", lp)):
        if len(msg.shape) != 2 or msg.shape[0] != t or msg.shape[1] < 1:
            raise MalformedMessage(f"{where}: {name} has shape {list(msg.shape)}, expected [{t}, k >= 1]")
    if list(ids.shape) != list(lp.shape):
        raise MalformedMessage(f"{where}: support_ids {list(ids.shape)} and teacher_support_logprobs "
                               f"{list(lp.shape)} differ in shape")
    if ids.dtype not in ("I64", "I32", "I16"):
        raise MalformedMessage(f"{where}: support_ids dtype {ids.dtype!r} is not an integer type")
    if lp.dtype not in ("F32", "F16", "BF16", "F64"):
        raise MalformedMessage(f"{where}: teacher_support_logprobs dtype {lp.dtype!r} is not a float type")
    ids_t, lp_t = tensor_from_proto(ids), tensor_from_proto(lp)
    _token_ids(ids_t.flatten().tolist(), f"{where} support_ids", lim.vocab_size)
    _finite(lp_t.float().numpy(), f"{where} teacher_support_logprobs", upper=_LOGPROB_TOL)


# ---------------------------------------------------------------------------------------
# Tensors


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (row-major); no copy when already contiguous."""
    import torch

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
    import torch

    to_torch = _dtype_maps()[0]
    if dtype not in to_torch:
        raise MalformedMessage(f"unknown tensor dtype {dtype!r}; expected one of {sorted(to_torch)}")
    tdt = to_torch[dtype]
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
    to_wire = _dtype_maps()[1]
    if t.dtype not in to_wire:
        raise ValueError(f"tensor dtype {t.dtype} has no wire name")
    return pb.Tensor(dtype=to_wire[t.dtype], shape=list(t.shape), data=bytes(tensor_bytes(t)))


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
    torch = sys.modules.get("torch")  # not loaded: `values` cannot be a tensor
    if torch is not None and isinstance(values, torch.Tensor):
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


def set_rollout_scores(group: pb.RolloutGroup, scores: Sequence[Any], *, teacher_version: int) -> None:
    """Fill one `TeacherScore` per completion (in place) from `rlrt_core.teacher_scoring.score_group`'s
    output: None = not scored by the method (context UNSPECIFIED, empty), a `RolloutScore` (read
    by attribute) otherwise; its tensors may be None (context "none": no privileged context)."""
    k = len(group.completions)
    if len(scores) != k:
        raise ValueError(f"group {group.group_id!r}: {len(scores)} scores for {k} completions")
    del group.teacher_scores[:]
    for i, sc in enumerate(scores):
        if sc is None:
            group.teacher_scores.add(teacher_version=teacher_version, context_kind=pb.CONTEXT_KIND_UNSPECIFIED,
                                     peer_index=-1)
            continue
        kind = _get(sc, "context_kind")
        if kind not in CONTEXT_KINDS:
            raise ValueError(f"unknown context kind {kind!r}; expected one of {sorted(CONTEXT_KINDS)}")
        out = group.teacher_scores.add(teacher_version=teacher_version, context_kind=CONTEXT_KINDS[kind],
                                       peer_index=int(_get(sc, "peer_index", -1)))
        n = len(group.completions[i].token_ids)
        student, teacher = _get(sc, "student_logprobs"), _get(sc, "teacher_logprobs")
        if student is None:
            continue
        for name, t in (("student_logprobs", student), ("teacher_logprobs", teacher)):
            if t is None or len(t) != n:
                raise ValueError(f"group {group.group_id!r} completion {i}: {name} has "
                                 f"{None if t is None else len(t)} values for {n} tokens")
        out.student_logprobs.extend(_as_list(student))
        out.teacher_logprobs.extend(_as_list(teacher))
        kl = _get(sc, "position_kl")
        if kl is not None:
            import torch

            row = torch.as_tensor(kl).detach().float().cpu()
            out.position_kl.extend(row.tolist())
            if n:
                out.position_kl_mean = float(row.mean())
                out.position_kl_max = float(row.max())
        ids, lp = _get(sc, "support_ids"), _get(sc, "teacher_support_logprobs")
        if ids is not None and lp is not None:
            import torch

            out.support_ids.CopyFrom(tensor_to_proto(ids.to(torch.int64)))
            out.teacher_support_logprobs.CopyFrom(tensor_to_proto(lp.float()))
        ent = _get(sc, "teacher_entropy")
        if ent is not None:
            out.teacher_entropy.extend(_as_list(ent))
    validate(group)
    group.timestamps.scored_at = time.time()
