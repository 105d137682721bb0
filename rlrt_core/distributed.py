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
- Several ranks (torchrun / `deepspeed` launcher): every rank runs the same step on the same
  groups, so gradients agree and ZeRO shards optimizer state (1), gradients (2) and parameters (3)
  across ranks: memory scales, compute is replicated.
- ZeRO-3: full parameters are gathered (`deepspeed.zero.GatheredParameters`) to publish weights
  and to write/read checkpoints. Its optimizer moments are not saved (they are partitioned and
  DeepSpeed writes them only through torch.save); a resumed ZeRO-3 run starts fresh Adam moments.
- ZeRO-1/2: the client AdamW's state holds the flattened fp32 moments of this rank's partition;
  `rlrt_core.checkpoint` saves them with safetensors and a resume needs the same world size.

On CPU the shared-memory all-reduce op would JIT-compile for minutes at start-up; gloo does the
job for tests, so the op is switched off there (DeepSpeed keeps one mutable dict of compatible ops).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
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
        """The optimizer whose (flattened, per-rank) state a checkpoint can hold; None under ZeRO-3."""
        return None if self.stage == 3 else self.client_optimizer

    def weights_loaded(self) -> None:
        """After the model's weights were overwritten in place: refresh ZeRO's fp32 master copy."""
        if self.stage in (1, 2, 3):
            self.zero_optimizer.refresh_fp32_params()
