from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContextKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTEXT_KIND_UNSPECIFIED: _ClassVar[ContextKind]
    CONTEXT_KIND_NONE: _ClassVar[ContextKind]
    CONTEXT_KIND_SOLUTION: _ClassVar[ContextKind]
    CONTEXT_KIND_PEER: _ClassVar[ContextKind]
CONTEXT_KIND_UNSPECIFIED: ContextKind
CONTEXT_KIND_NONE: ContextKind
CONTEXT_KIND_SOLUTION: ContextKind
CONTEXT_KIND_PEER: ContextKind

class Problem(_message.Message):
    __slots__ = ("id", "prompt", "answer", "solution")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOLUTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    answer: str
    solution: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., answer: _Optional[str] = ..., solution: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PromptTask(_message.Message):
    __slots__ = ("group_id", "run_id", "problem", "n_samples", "min_version", "dispatched_at")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_AT_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    run_id: str
    problem: Problem
    n_samples: int
    min_version: int
    dispatched_at: float
    def __init__(self, group_id: _Optional[str] = ..., run_id: _Optional[str] = ..., problem: _Optional[_Union[Problem, _Mapping]] = ..., n_samples: _Optional[int] = ..., min_version: _Optional[int] = ..., dispatched_at: _Optional[float] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "text", "token_versions")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    text: str
    token_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., text: _Optional[str] = ..., token_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class VerifierResult(_message.Message):
    __slots__ = ("reward", "extracted", "reason", "timed_out")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    EXTRACTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    reward: float
    extracted: str
    reason: str
    timed_out: bool
    def __init__(self, reward: _Optional[float] = ..., extracted: _Optional[str] = ..., reason: _Optional[str] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class TeacherScore(_message.Message):
    __slots__ = ("student_logprobs", "teacher_logprobs", "teacher_version", "context_kind", "peer_index", "student_topk_ids", "student_topk_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "position_kl", "position_kl_mean", "position_kl_max", "support_ids", "teacher_support_logprobs", "teacher_entropy")
    STUDENT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_KIND_FIELD_NUMBER: _ClassVar[int]
    PEER_INDEX_FIELD_NUMBER: _ClassVar[int]
    STUDENT_TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POSITION_KL_FIELD_NUMBER: _ClassVar[int]
    POSITION_KL_MEAN_FIELD_NUMBER: _ClassVar[int]
    POSITION_KL_MAX_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_IDS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_SUPPORT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    student_logprobs: _containers.RepeatedScalarFieldContainer[float]
    teacher_logprobs: _containers.RepeatedScalarFieldContainer[float]
    teacher_version: int
    context_kind: ContextKind
    peer_index: int
    student_topk_ids: Tensor
    student_topk_logprobs: Tensor
    teacher_topk_ids: Tensor
    teacher_topk_logprobs: Tensor
    position_kl: _containers.RepeatedScalarFieldContainer[float]
    position_kl_mean: float
    position_kl_max: float
    support_ids: Tensor
    teacher_support_logprobs: Tensor
    teacher_entropy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, student_logprobs: _Optional[_Iterable[float]] = ..., teacher_logprobs: _Optional[_Iterable[float]] = ..., teacher_version: _Optional[int] = ..., context_kind: _Optional[_Union[ContextKind, str]] = ..., peer_index: _Optional[int] = ..., student_topk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., student_topk_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., teacher_topk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., teacher_topk_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., position_kl: _Optional[_Iterable[float]] = ..., position_kl_mean: _Optional[float] = ..., position_kl_max: _Optional[float] = ..., support_ids: _Optional[_Union[Tensor, _Mapping]] = ..., teacher_support_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., teacher_entropy: _Optional[_Iterable[float]] = ...) -> None: ...

class Timestamps(_message.Message):
    __slots__ = ("dispatched_at", "generated_at", "verified_at", "scored_at", "generation_s")
    DISPATCHED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    SCORED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_S_FIELD_NUMBER: _ClassVar[int]
    dispatched_at: float
    generated_at: float
    verified_at: float
    scored_at: float
    generation_s: float
    def __init__(self, dispatched_at: _Optional[float] = ..., generated_at: _Optional[float] = ..., verified_at: _Optional[float] = ..., scored_at: _Optional[float] = ..., generation_s: _Optional[float] = ...) -> None: ...

class RolloutGroup(_message.Message):
    __slots__ = ("group_id", "run_id", "problem", "prompt_ids", "completions", "version", "engine", "worker_id", "timestamps", "min_version", "verifier_results", "teacher_scores")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_RESULTS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_SCORES_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    run_id: str
    problem: Problem
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    version: int
    engine: str
    worker_id: str
    timestamps: Timestamps
    min_version: int
    verifier_results: _containers.RepeatedCompositeFieldContainer[VerifierResult]
    teacher_scores: _containers.RepeatedCompositeFieldContainer[TeacherScore]
    def __init__(self, group_id: _Optional[str] = ..., run_id: _Optional[str] = ..., problem: _Optional[_Union[Problem, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., version: _Optional[int] = ..., engine: _Optional[str] = ..., worker_id: _Optional[str] = ..., timestamps: _Optional[_Union[Timestamps, _Mapping]] = ..., min_version: _Optional[int] = ..., verifier_results: _Optional[_Iterable[_Union[VerifierResult, _Mapping]]] = ..., teacher_scores: _Optional[_Iterable[_Union[TeacherScore, _Mapping]]] = ...) -> None: ...
