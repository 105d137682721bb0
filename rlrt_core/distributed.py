"""DeepSpeed ZeRO for the learner (`learner.deepspeed` set in the config).

`DeepSpeedBackend` wraps the policy and the learner's own AdamW in a DeepSpeed engine and
gives `PolicyLearner` the four things a step needs: open a mini-batch, back-propagate a
micro-batch, finish (clip + optimizer step, or skip), and read the full weights.

- The LR schedule stays ours (LambdaLR on the client AdamW, stepped once per learner step);
  ZeRO's optimizer shares that optimizer's `param_groups`, so the learning rate it sets applies.
- Micro-batch accumulation is ours too: `gradient_accumulation_steps` is 1 and the accumulation
  boundary is set per backward (the last micro-batch of a mini-batch), because the number of
  micro-batches per mini-batch varies with the groups' sizes.
- Gradient clipping is DeepSpeed's (`gradient_clipping` = learner.grad_clip).
- Several ranks (torchrun; `rlrt_core.learner_ranks` runs the service's ranks): every rank
  holds the whole batch but runs only its share of each mini-batch's micro-batches (see
  `PolicyLearner.step`); DeepSpeed averages the gradients across ranks, ZeRO shards optimizer
  state (1), gradients (2) and parameters (3): memory scales and compute is divided.
- ZeRO-3: full parameters are gathered (`deepspeed.zero.GatheredParameters`) to publish weights
  and to write/read checkpoints.
- Checkpoints (stages 1-3): every rank writes its own partition of the optimizer, fp32 master
  weights and Adam moments, as `zero_rank<r>_of_<W>.safetensors` (`write_shard`/`load_shard`),
  read from the engine's flat fp32 partitions and the client AdamW's state for them. DeepSpeed's
  own `save_checkpoint` would torch.save (pickle) them; consolidating to one file would gather
  every moment on rank 0 (memory of the whole optimizer on one host). A resume needs the same
  world size and stage (checked, with a clear error).

On CPU the shared-memory all-reduce op would JIT-compile for minutes at start-up; gloo does the
job for tests, so the op is switched off there (DeepSpeed keeps one mutable dict of compatible ops).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from rlrt_core.config import LearnerConfig

log = logging.getLogger("rlrt.distributed")

def ds_config(user: dict[str, Any], cfg: LearnerConfig, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config dict: the user's `learner.deepspeed` plus the fields the learner owns."""
    out = copy.deepcopy(user)
    zero = out.setdefault("zero_optimization", {"stage": 1})
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"learner.deepspeed.zero_optimization.stage must be 0..3, got {stage}")
    for key in ("gradient_accumulation_steps", "optimizer", "scheduler"):
        if key in out and not (key == "gradient_accumulation_steps" and out[key] == 1):
            raise ValueError(f"learner.deepspeed.{key} is set by the learner (AdamW + warm-up from learner.*, "
                             f"accumulation per mini-batch); remove it from the deepspeed section")
    out["gradient_accumulation_steps"] = 1
    out.setdefault("train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    out["train_batch_size"] = int(out["train_micro_batch_size_per_gpu"]) * world_size
    out.setdefault("gradient_clipping", cfg.grad_clip)
    # Our AdamW is a plain torch optimizer; DeepSpeed calls that "untested" with ZeRO.
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("steps_per_print", 1 << 30)
    return out


def init_process_env() -> None:
    """A single process started without a launcher: give torch.distributed a world of one
    (otherwise DeepSpeed tries MPI discovery and fails)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


class DeepSpeedBackend:
    """A DeepSpeed engine around `model` and the client `optimizer` (built by the learner)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: LearnerConfig) -> None:
        init_process_env()
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Our timeout, not torch's 30 min default: a rank whose peer died fails its collective
        # within learner.dist_timeout_s and exits (gloo usually notices a closed socket sooner).
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.config = ds_config(cfg.deepspeed or {}, cfg, world)
        self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                      config=self.config)
        self.client_optimizer = optimizer
        self.stage = int(self.engine.zero_optimization_stage())
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = world
        log.info("DeepSpeed ZeRO-%d engine: rank %d of %d, %s", self.stage, self.rank, world,
                 type(self.zero_optimizer).__name__)

    # -- one mini-batch -------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Back-propagate one micro-batch; `last` marks the mini-batch's final one (reduce + step)."""
        # The scorer calls the module, not engine.forward, which is where ZeRO counts micro-steps
        # (ZeRO-3 accumulates gradients only from the second micro-step on): do its bookkeeping here.
        if hasattr(self.zero_optimizer, "clear_backward_seen_flag"):
            self.zero_optimizer.clear_backward_seen_flag()
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def finish(self, finite: bool) -> float | None:
        """Clip and apply the accumulated gradients; returns the pre-clip grad norm, or None when
        the update was skipped (non-finite forward on any rank, or a non-finite gradient norm)."""
        if self.world_size > 1:
            flag = torch.tensor([1.0 if finite else 0.0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item() > 0)
        if not finite:
            self.engine.zero_grad()
            return None
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm if torch.isfinite(torch.tensor(norm)) else None

    # -- full weights ---------------------------------------------------------------------
    @contextlib.contextmanager
    def full_params(self, *, modify: bool = False) -> Iterator[None]:
        """Inside: every parameter holds its full value (ZeRO-3 gathers; 1/2 already do).
        `modify=True` writes rank 0's changes back into the partitions on exit."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def scoring(self) -> Any:
        """Context for a scoring pass: under ZeRO-3 the lm_head weight stays gathered (the scorer
        reads its shape and device, and runs it chunk by chunk); a no-op for stages 0-2."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        head = self.engine.module.get_output_embeddings()
        return deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None)

    def checkpoint_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer `rlrt_core.checkpoint` saves whole: the client AdamW under stage 0 (its
        state is the same on every rank); None under ZeRO-1/2/3, whose state is in the shards."""
        return self.client_optimizer if self.stage == 0 else None

    @property
    def shards(self) -> bool:
        """True when every rank's optimizer partition goes into a shard file of its own."""
        return self.stage in (1, 2, 3)

    def shard_name(self) -> str:
        return f"zero_rank{self.rank:03d}_of_{self.world_size:03d}.safetensors"

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions, one flat tensor per (sub-)group; the client AdamW's
        state is keyed by them (ZeRO swaps them into its param_groups around each step)."""
        if self.stage == 3:
            return list(self.zero_optimizer.fp32_partitioned_groups_flat)
        return list(self.zero_optimizer.single_partition_of_fp32_groups)

    def write_shard(self, directory: str | os.PathLike[str]) -> Path:
        """Write this rank's optimizer partition (fp32 master [n_i], exp_avg [n_i], exp_avg_sq [n_i]
        per flat group i, plus scalars such as `step`) to `directory` with safetensors."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for i, flat in enumerate(self._flat_partitions()):
            tensors[f"{i}.master"] = flat.detach().cpu().contiguous()
            for name, value in self.client_optimizer.state.get(flat, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(i), {})[name] = value
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.client_optimizer.param_groups]
        meta = {"stage": self.stage, "rank": self.rank, "world_size": self.world_size,
                "scalars": scalars, "param_groups": groups}
        path = Path(directory) / self.shard_name()
        save_file(tensors, str(path), metadata={"rlrt": json.dumps(meta)})
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return path

    def load_shard(self, directory: str | os.PathLike[str]) -> bool:
        """Load this rank's partition written by `write_shard`; False when the checkpoint has no
        shards at all (written without them: fresh moments). ValueError when it was written by
        another world size or ZeRO stage (partitions would not line up)."""
        from safetensors import safe_open

        directory = Path(directory)
        path = directory / self.shard_name()
        if not path.is_file():
            found = sorted(p.name for p in directory.glob("zero_rank*_of_*.safetensors"))
            if not found:
                return False
            raise ValueError(f"checkpoint {directory} holds optimizer shards {found[:4]}, none for rank {self.rank} "
                             f"of {self.world_size}: resume with the world size it was written with")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("rlrt", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("stage") != self.stage or meta.get("world_size") != self.world_size:
            raise ValueError(f"{path}: written by ZeRO-{meta.get('stage')} with {meta.get('world_size')} ranks, "
                             f"this is ZeRO-{self.stage} with {self.world_size}")
        flats = self._flat_partitions()
        for i, flat in enumerate(flats):
            master = tensors.get(f"{i}.master")
            if master is None or master.shape != flat.shape:
                raise ValueError(f"{path}: partition {i} has shape {None if master is None else tuple(master.shape)}, "
                                 f"the engine's has {tuple(flat.shape)}")
            with torch.no_grad():
                flat.copy_(master.to(flat.device, flat.dtype))
            state = {name.split(".", 1)[1]: t.to(flat.device) for name, t in tensors.items()
                     if name.startswith(f"{i}.") and name != f"{i}.master"}
            state.update(meta.get("scalars", {}).get(str(i), {}))
            if state:
                self.client_optimizer.state[flat] = state
        for g, saved in zip(self.client_optimizer.param_groups, meta.get("param_groups", [])):
            g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
        # The model's working weights came from model.safetensors (they are these masters, cast to
        # the model dtype), so only the fp32 masters needed restoring: exact also for bf16 models.
        return True

    def weights_loaded(self) -> None:
        """After the model's weights were overwritten in place: refresh ZeRO's fp32 master copy."""
        if self.stage in (1, 2, 3):
            self.zero_optimizer.refresh_fp32_params()


# -- small collectives over bytes (no pickle: torch's *_object collectives unpickle) ----------

def broadcast_bytes(data: bytes | None, *, src: int = 0, device: str | torch.device = "cpu") -> bytes:
    """Broadcast `data` from rank `src` (others pass None): a length, then a uint8 tensor."""
    import torch.distributed as dist

    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(n, src)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if dist.get_rank() == src and n.item()
           else torch.empty(int(n.item()), dtype=torch.uint8, device=device))
    if n.item():
        dist.broadcast(buf, src)
    return bytes(buf.cpu().numpy().tobytes()) if n.item() else b""


def all_gather_bytes(data: bytes, *, device: str | torch.device = "cpu") -> list[bytes]:
    """Every rank's `data`, in rank order (sizes first, then padded uint8 tensors)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = max(int(s.item()) for s in sizes)
    buf = torch.zeros(top, dtype=torch.uint8, device=device)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    outs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(outs, buf)
    return [bytes(o[: int(s.item())].cpu().numpy().tobytes()) for o, s in zip(outs, sizes)]


def all_ok(ok: bool, *, device: str | torch.device = "cpu") -> bool:
    """True when `ok` holds on every rank (a MIN all-reduce)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def merge_loss_metrics(agg: dict[str, float], agg_max: dict[str, float], tokens: float, *,
                       device: str | torch.device = "cpu") -> tuple[dict[str, float], dict[str, float], float]:
    """Merge the ranks' token-weighted loss sums (added), extrema (`*_max` max, `*_min` min) and
    token counts into the step's totals, as one rank running every micro-batch would have."""
    mine = json.dumps({"agg": agg, "ext": agg_max, "tok": tokens}).encode()
    s_agg: dict[str, float] = {}
    s_ext: dict[str, float] = {}
    s_tok = 0.0
    for raw in all_gather_bytes(mine, device=device):
        part = json.loads(raw)
        for k, v in part["agg"].items():
            s_agg[k] = s_agg.get(k, 0.0) + v
        for k, v in part["ext"].items():
            s_ext[k] = v if k not in s_ext else (min(s_ext[k], v) if k.endswith("_min") else max(s_ext[k], v))
        s_tok += part["tok"]
    return s_agg, s_ext, s_tok
