"""The policy update: one learner step on a batch of scored rollout groups.

Read top to bottom, a step is (paper Algorithm 1 + Table 5's DAPO-style surrogate):

1. group advantages      A^(k) = (r_k - mean_g r) / (std_g r + eps)        (std per the method's spec)
2. π_old log-probs       log π_old(y_t | x, y<t) under the weights before this step (if the loss needs it)
3. token advantages      A_t = A · [(1-λ) + λ · clip(w_t, 1-ε_w, 1+ε_w)]   (eq. 7; w_t per method)
4. PPO mini-batches      the method's registered loss (`rlrt_core.losses`): PPO clip-higher × truncated
                         IS for GRPO/RLSD/RLRT, self-distillation for SDPO, both routed for SRPO
5. AdamW with warm-up, grad-clip; a non-finite loss or gradient skips the update (counted)

The method is data (`rlrt_core.methods.MethodSpec`): the step looks up its weight, its loss and
what that loss needs; no method name appears here.

The learner never sees Redis or gRPC: the service hands it `TrainGroup`s and publishes
the weights it returns. Everything here also works as a library inside another trainer.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlrt_core import algorithms
from rlrt_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from rlrt_core.config import AlgorithmConfig, LearnerConfig
from rlrt_core.losses import LossBatch, get_loss
from rlrt_core.methods import correct_mask, get_method
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.scoring import score_tokens
from rlrt_core.transport.codec import tensor_from_proto


@dataclass
class TrainSample:
    """One completion of a group, as the learner needs it.

    `student_logprobs`/`teacher_logprobs` come from the teacher scorer ([T] floats each)
    and are None where the method does not reweight this rollout (weight 1).
    `support_ids` [T, k] int64 / `teacher_support_logprobs` [T, k]: the student's top-k ids and
    the teacher's log-probs there (SDPO/SRPO distillation target), None without a teacher.
    `teacher_entropy`: [T] entropy of the teacher view (SRPO), or None."""

    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]
    reward: float
    student_logprobs: list[float] | None = None
    teacher_logprobs: list[float] | None = None
    support_ids: torch.Tensor | None = None
    teacher_support_logprobs: torch.Tensor | None = None
    teacher_entropy: list[float] | None = None


@dataclass
class TrainGroup:
    """K completions of one prompt, generated with weight `version`."""

    group_id: str
    version: int
    samples: list[TrainSample]


def train_group(g: pb.RolloutGroup) -> TrainGroup:
    """A verified (and possibly teacher-scored) protobuf group -> the learner's `TrainGroup`.

    Raises ValueError naming the group when rewards or behaviour log-probs are missing; a
    score without log-probs (not scored / no context) gives None fields (weight 1, no target)."""
    if len(g.verifier_results) != len(g.completions):
        raise ValueError(f"group {g.group_id}: {len(g.completions)} completions, {len(g.verifier_results)} rewards")
    samples = []
    for i, c in enumerate(g.completions):
        n = len(c.token_ids)
        if len(c.logprobs) != n:
            raise ValueError(f"group {g.group_id}: completion {i} has {n} tokens but {len(c.logprobs)} behaviour log-probs")
        sc = g.teacher_scores[i] if i < len(g.teacher_scores) else None
        has = sc is not None and n > 0 and len(sc.teacher_logprobs) == n and len(sc.student_logprobs) == n
        support = has and sc.HasField("support_ids") and sc.HasField("teacher_support_logprobs")
        samples.append(TrainSample(
            prompt_ids=list(g.prompt_ids), response_ids=list(c.token_ids), behavior_logprobs=list(c.logprobs),
            reward=float(g.verifier_results[i].reward),
            student_logprobs=list(sc.student_logprobs) if has else None,
            teacher_logprobs=list(sc.teacher_logprobs) if has else None,
            support_ids=tensor_from_proto(sc.support_ids).long() if support else None,
            teacher_support_logprobs=tensor_from_proto(sc.teacher_support_logprobs).float() if support else None,
            teacher_entropy=list(sc.teacher_entropy) if has and len(sc.teacher_entropy) == n else None))
    return TrainGroup(group_id=g.group_id, version=int(g.version), samples=samples)


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped_updates: int
    applied_updates: int


def _pad(rows: Sequence[Sequence[float]], length: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out


def make_optimizer(model: torch.nn.Module, cfg: LearnerConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights get no weight decay (the usual LLM recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: LearnerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps` learner steps, then constant (Table 5)."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PolicyLearner:
    """Holds the policy, its optimizer and scheduler; `step(groups)` is one learner step.

    `step_index` counts completed learner steps (drives λ's schedule and warm-up);
    the caller turns each step into a new weight version."""

    def __init__(self, model: torch.nn.Module, learner_cfg: LearnerConfig, algo_cfg: AlgorithmConfig,
                 *, temperature: float = 1.0, device: str | torch.device = "cpu") -> None:
        self.model = model
        # Read before DeepSpeed may partition the weights (ZeRO-3 leaves empty shapes behind).
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.cfg = learner_cfg
        self.algo = algo_cfg
        self.temperature = temperature
        self.device = torch.device(device)
        self.model.to(self.device)
        self.optimizer = make_optimizer(model, learner_cfg)
        self.scheduler = make_scheduler(self.optimizer, learner_cfg)
        # learner.deepspeed set: ZeRO engine around the same model and AdamW (rlrt_core.distributed).
        self.ds = None
        if learner_cfg.deepspeed is not None:
            from rlrt_core.distributed import DeepSpeedBackend

            self.ds = DeepSpeedBackend(model, self.optimizer, learner_cfg)
        self.step_index = 0
        self.skipped_updates_total = 0

    # -- state for checkpoints -------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"step_index": self.step_index, "skipped_updates_total": self.skipped_updates_total}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step_index = int(state.get("step_index", 0))
        self.skipped_updates_total = int(state.get("skipped_updates_total", 0))

    def full_params(self, *, modify: bool = False) -> Any:
        """Context in which `model.state_dict()` holds full weights (ZeRO-3 gathers them)."""
        return self.ds.full_params(modify=modify) if self.ds is not None else contextlib.nullcontext()

    def checkpoint_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer a checkpoint saves (None: its state is not resumable, ZeRO-3)."""
        return self.ds.checkpoint_optimizer() if self.ds is not None else self.optimizer

    def weights_loaded(self) -> None:
        """Call after overwriting the model's weights in place (a resume): syncs ZeRO's fp32 master copy."""
        if self.ds is not None:
            self.ds.weights_loaded()

    @property
    def ranks(self) -> tuple[int, int]:
        """(world size, this rank): (1, 0) without DeepSpeed."""
        return (self.ds.world_size, self.ds.rank) if self.ds is not None else (1, 0)

    def save_checkpoint(self, root: str | os.PathLike[str], *, step: int, version: int, extra: dict[str, Any],
                        keep: int = 2, before_commit: Callable[[], None] | None = None,
                        write_shards: Callable[[Path], None] | None = None) -> Path:
        """Write a checkpoint of the full weights, optimizer and scheduler (`rlrt_core.checkpoint`).
        Under ZeRO-1/2/3 the optimizer goes in per-rank shards: `write_shards(tmp_dir)` writes them
        (a multi-rank caller has every rank write its own); by default this rank writes its own."""
        if self.ds is not None and self.ds.shards and write_shards is None:
            write_shards = self.ds.write_shard
        with self.full_params():
            return save_checkpoint(root, step=step, version=version, model=self.model,
                                   optimizer=self.checkpoint_optimizer(), scheduler=self.scheduler, extra=extra,
                                   keep=keep, before_commit=before_commit, write_files=write_shards)

    def restore(self, path: str | os.PathLike[str]) -> Checkpoint:
        """Load a checkpoint written by `save_checkpoint`: weights, optimizer (this rank's shard
        under ZeRO), scheduler, RNG and the learner's own counters. Every rank calls it."""
        with self.full_params(modify=True):
            loaded = load_checkpoint(path, model=self.model, optimizer=self.checkpoint_optimizer(),
                                     scheduler=self.scheduler)
        self.weights_loaded()
        if self.ds is not None and self.ds.shards and not self.ds.load_shard(path):
            import logging

            logging.getLogger("rlrt.learner").warning("%s has no optimizer shards: Adam moments start afresh", path)
        self.load_state(loaded.state.get("extra", {}).get("learner", {}))
        return loaded

    # -- pieces of a step --------------------------------------------------------------
    def _logprobs(self, prompts: list[list[int]], responses: list[list[int]], length: int, *,
                  grad: bool, with_entropy: bool = False, support_ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs [b, length] (and entropy [b, length], log-probs at `support_ids` [b, length, k])
        of responses under the current weights."""
        with self.ds.scoring() if self.ds is not None else contextlib.nullcontext():
            res = score_tokens(self.model, prompts, responses, temperature=self.temperature,
                               with_entropy=with_entropy, grad=grad, support_ids=support_ids)
        lp = res.logprobs.to(self.device)
        ent = res.entropy.to(self.device) if res.entropy is not None else None
        sup = res.support_logprobs.to(self.device) if res.support_logprobs is not None else None
        t = lp.shape[1]
        if t < length:  # score_tokens pads to the micro-batch's longest response
            lp = torch.nn.functional.pad(lp, (0, length - t))
            ent = torch.nn.functional.pad(ent, (0, length - t)) if ent is not None else None
            sup = torch.nn.functional.pad(sup, (0, 0, 0, length - t)) if sup is not None else None
        return (lp[:, :length], ent[:, :length] if ent is not None else None,
                sup[:, :length] if sup is not None else None)

    def _old_logprobs(self, prompts: list[list[int]], responses: list[list[int]], length: int) -> torch.Tensor:
        """π_old log-probs [B, length]. Several ranks: each scores every W-th micro-batch and a sum
        all-reduce assembles the whole (exact: the other ranks add zeros)."""
        mb = self.cfg.micro_batch_size
        world, rank = self.ranks
        starts = list(range(0, len(prompts), mb))
        mine = starts[rank::world]
        out = torch.zeros(len(prompts), length, device=self.device)
        self.model.eval()
        with torch.no_grad():
            for k in range(-(-len(starts) // world)):
                # A rank with no chunk left still runs one (ZeRO-3 gathers weights with collectives).
                i = mine[k] if k < len(mine) else starts[0]
                lp, _, _ = self._logprobs(prompts[i:i + mb], responses[i:i + mb], length, grad=False)
                if k < len(mine):
                    out[i:i + mb] = lp
        if world > 1:
            torch.distributed.all_reduce(out)
        return out

    def _support(self, samples: Sequence[TrainSample], length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(support ids [b, length, k] long, teacher log-probs there [b, length, k]) on the device,
        built per micro-batch (a whole step's [B, T, k] rows would not fit at paper scale). Rows
        come sorted by the student's probability, so the first k columns are the top-k support.
        Rows without a target get id 0 / log-prob 0 (the loss masks them through has_teacher)."""
        ids = torch.zeros(len(samples), length, k, dtype=torch.long)
        lps = torch.zeros(len(samples), length, k)
        for i, s in enumerate(samples):
            if s.support_ids is not None and s.teacher_support_logprobs is not None:
                n = len(s.response_ids)
                ids[i, :n] = s.support_ids[:, :k]
                lps[i, :n] = s.teacher_support_logprobs[:, :k]
        return ids.to(self.device), lps.to(self.device)

    def _check_support(self, groups: Sequence[TrainGroup]) -> None:
        """ValueError naming the group when a sample's support rows do not fit its response or
        the vocabulary (checked before any compute, so a bad group never half-updates)."""
        vocab = self.vocab_size
        for g in groups:
            for i, s in enumerate(g.samples):
                if (s.support_ids is None) != (s.teacher_support_logprobs is None):
                    raise ValueError(f"group {g.group_id} sample {i}: support_ids and teacher_support_logprobs "
                                     f"must come together")
                if s.support_ids is None:
                    continue
                n = len(s.response_ids)
                if (s.support_ids.ndim != 2 or s.support_ids.shape[0] != n or s.support_ids.shape[1] < 1
                        or tuple(s.teacher_support_logprobs.shape) != tuple(s.support_ids.shape)):
                    raise ValueError(f"group {g.group_id} sample {i}: support rows {tuple(s.support_ids.shape)}/"
                                     f"{tuple(s.teacher_support_logprobs.shape)} for a response of {n} tokens")
                if n and (int(s.support_ids.min()) < 0 or int(s.support_ids.max()) >= vocab):
                    raise ValueError(f"group {g.group_id} sample {i}: support ids outside the vocabulary [0, {vocab})")
                if not bool(torch.isfinite(s.teacher_support_logprobs).logical_or(
                        torch.isneginf(s.teacher_support_logprobs)).all()):
                    raise ValueError(f"group {g.group_id} sample {i}: teacher support log-probs hold NaN or +inf")

    def _one_update(self, n_groups: int) -> bool:
        """True when a step on `n_groups` groups makes exactly one optimizer update (one PPO
        epoch, one mini-batch), so its training forward runs on π_old's weights."""
        return self.cfg.ppo_epochs == 1 and self.cfg.mini_batch_groups >= n_groups

    def step(self, groups: Sequence[TrainGroup]) -> StepResult:
        """One learner step on `groups` (normally `groups_per_step` of them)."""
        if not groups:
            raise ValueError("step() needs at least one group")
        t0 = time.perf_counter()
        algo = self.algo
        spec = get_method(algo.method)
        loss_spec = get_loss(spec.loss)
        samples = [s for g in groups for s in g.samples]
        for g in groups:
            for s in g.samples:
                if len(s.behavior_logprobs) != len(s.response_ids):
                    raise ValueError(f"group {g.group_id}: behaviour log-probs ({len(s.behavior_logprobs)}) "
                                     f"and response ids ({len(s.response_ids)}) differ in length")
        if loss_spec.needs_support:
            self._check_support(groups)
        B = len(samples)
        T = max(1, max(len(s.response_ids) for s in samples))
        prompts = [list(s.prompt_ids) for s in samples]
        responses = [list(s.response_ids) for s in samples]
        mask = _pad([[1.0] * len(s.response_ids) for s in samples], T, torch.float32).bool().to(self.device)
        behavior = _pad([s.behavior_logprobs for s in samples], T, torch.float32).to(self.device)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32, device=self.device)

        # 1. group advantages (eq. 2's A), per group so groups may differ in K
        adv_rows = [algorithms.group_advantages(torch.tensor([[s.reward for s in g.samples]], dtype=torch.float32),
                                                norm_by_std=algo.std_normalised, eps=algo.adv_eps)[0]
                    for g in groups]
        advantages = torch.cat(adv_rows).to(self.device)

        # 2. π_old: the weights before this step (the behaviour policy may be older); only for
        # losses with a PPO ratio. When the step makes one optimizer update, the training forward
        # runs on exactly these weights: π_old is then its own output, detached (as verl does),
        # not a separate pass.
        detached_old = loss_spec.needs_old_logprobs and self._one_update(len(groups))
        old_lp = (self._old_logprobs(prompts, responses, T)
                  if loss_spec.needs_old_logprobs and not detached_old else None)

        # 3. token advantages (eq. 7). Rollouts without teacher scores get D̂ = 0 (weight 1).
        lam = algorithms.mixing_schedule(self.step_index, lam_init=algo.lam_init, decay_steps=algo.decay_steps)
        if not spec.needs_teacher:
            student_lp, teacher_lp = behavior, None
        else:
            student_lp = _pad([s.student_logprobs or [0.0] * len(s.response_ids) for s in samples], T,
                              torch.float32).to(self.device)
            teacher_lp = _pad([s.teacher_logprobs or (s.student_logprobs or [0.0] * len(s.response_ids))
                               for s in samples], T, torch.float32).to(self.device)
        if spec.weight is not None:
            tok_adv = algorithms.token_advantages(algo.method, advantages, rewards, student_lp, teacher_lp, mask,
                                                  lam=lam, eps_w=algo.eps_w)
        else:  # the loss does not shape advantages (SDPO): A broadcast, for diagnostics
            tok_adv = torch.where(mask, advantages[:, None].expand_as(behavior), torch.zeros_like(behavior))

        # Rollouts the teacher scored: their student view (scored by the teacher service on the
        # version it held) against this step's π_old is what D̂_t would change by if the learner
        # formed it from its own π_old pass (rlrt/student_view_drift below).
        scored = torch.tensor([s.teacher_logprobs is not None for s in samples], device=self.device)
        drift = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum |Δ|, tokens]
        track_drift = teacher_lp is not None and loss_spec.needs_old_logprobs and bool(scored.any())

        def add_drift(old: torch.Tensor, rows: Any) -> None:  # old: [b, T] π_old of `rows`
            sel = mask[rows] & scored[rows][:, None]
            drift.add_(torch.stack([(old - student_lp[rows]).abs()[sel].sum().double(), sel.sum().double()]))

        if track_drift and old_lp is not None:
            add_drift(old_lp, slice(None))
        has_teacher = torch.tensor([s.support_ids is not None and s.teacher_support_logprobs is not None
                                    for s in samples], dtype=torch.bool, device=self.device)
        full = LossBatch(mask=mask, rewards=rewards, behavior_logprobs=behavior, token_advantages=tok_adv,
                         old_logprobs=old_lp, has_teacher=has_teacher)
        # One support size per step: the smallest shipped (normally all equal distill_topk).
        support_k = min((int(s.support_ids.shape[-1]) for s in samples if s.support_ids is not None
                         and s.support_ids.ndim == 2), default=1)
        if any(s.teacher_entropy is not None for s in samples):
            full.teacher_entropy = _pad([s.teacher_entropy or [] for s in samples], T, torch.float32).to(self.device)

        # 4. PPO mini-batches over groups; token-mean over each mini-batch's tokens
        self.model.train()
        group_index: list[list[int]] = []
        start = 0
        for g in groups:
            group_index.append(list(range(start, start + len(g.samples))))
            start += len(g.samples)
        agg: dict[str, float] = {}
        agg_max: dict[str, float] = {}
        agg_tokens = 0.0
        applied = skipped = 0
        grad_norms: list[float] = []
        mb_groups = self.cfg.mini_batch_groups
        for _epoch in range(self.cfg.ppo_epochs):
            for gs in range(0, len(groups), mb_groups):
                rows = [i for gi in group_index[gs:gs + mb_groups] for i in gi]
                mb = loss_spec.prepared(full.rows(rows), algo)
                n_tok = float(mb.loss_mask.sum().item())
                if n_tok == 0:
                    continue
                if self.ds is not None:
                    self.ds.zero_grad()
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                finite = True
                # Micro-batches with no loss token (e.g. no SDPO target) are not run at all.
                micros = [list(range(ms, min(ms + self.cfg.micro_batch_size, len(rows))))
                          for ms in range(0, len(rows), self.cfg.micro_batch_size)]
                micros = [loc for loc in micros if bool(mb.loss_mask[loc].any())]
                # Several ranks: rank r runs micro-batches r, r+W, ...; a rank with none left runs a
                # zero-weighted one so every rank makes the same collectives. DeepSpeed averages
                # gradients over ranks, hence the factor W: the sum equals the one-rank step.
                world, rank = self.ranks
                mine = micros[rank::world]
                rounds = -(-len(micros) // world)
                for mi in range(rounds):
                    dummy = mi >= len(mine)
                    local = micros[0] if dummy else mine[mi]
                    idx = [rows[j] for j in local]
                    micro = mb.rows(local)
                    micro_tok = float(micro.loss_mask.sum().item())
                    if loss_spec.needs_support:
                        micro.support_ids, micro.teacher_support_logprobs = self._support(
                            [samples[i] for i in idx], T, support_k)
                    lp, ent, sup = self._logprobs([prompts[i] for i in idx], [responses[i] for i in idx], T,
                                                  grad=True, with_entropy=algo.entropy_coef > 0,
                                                  support_ids=micro.support_ids)
                    if detached_old:
                        micro.old_logprobs = lp.detach()
                        if track_drift and not dummy:  # one update: one epoch, each row once
                            add_drift(micro.old_logprobs, idx)
                    m = micro.mask
                    if not (bool(torch.isfinite(lp[m]).all())
                            and (micro.old_logprobs is None or bool(torch.isfinite(micro.old_logprobs[m]).all()))):
                        finite = False  # a non-finite forward pass: skip this update, count it
                        if world == 1:
                            break
                    micro.logprobs, micro.entropy, micro.support_logprobs = lp, ent, sup
                    loss, met = loss_spec.fn(micro, algo)
                    if not torch.isfinite(loss):
                        finite = False
                        if world == 1:
                            break
                    last = mi == rounds - 1
                    if self.ds is not None:
                        # (Several ranks keep back-propagating after a non-finite pass: the update is
                        # skipped by all of them together in finish, and their collectives stay paired.)
                        self.ds.backward(loss * ((0.0 if dummy else micro_tok * world) / n_tok), last=last)
                    else:
                        (loss * (micro_tok / n_tok)).backward()
                    if dummy:
                        continue
                    for k, v in met.items():
                        if k == "n_tokens" or not (isinstance(v, (int, float)) and math.isfinite(v)):
                            continue
                        if k.endswith("_max"):
                            agg_max[k] = max(agg_max.get(k, float(v)), float(v))
                        elif k.endswith("_min"):
                            agg_max[k] = min(agg_max.get(k, float(v)), float(v))
                        else:  # token-weighted mean over the step
                            agg[k] = agg.get(k, 0.0) + float(v) * micro_tok
                    agg_tokens += micro_tok
                if self.ds is not None:
                    ds_norm = self.ds.finish(finite)
                    if ds_norm is None:
                        skipped += 1
                    else:
                        grad_norms.append(ds_norm)
                        applied += 1
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                if not finite or not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                grad_norms.append(float(grad_norm))
                self.optimizer.step()
                applied += 1
        if self.ds is not None:
            self.ds.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        if self.ranks[0] > 1:  # each rank saw its own micro-batches: merge their loss metrics
            from rlrt_core.distributed import merge_loss_metrics

            if track_drift and detached_old:
                torch.distributed.all_reduce(drift)

            agg, agg_max, agg_tokens = merge_loss_metrics(agg, agg_max, agg_tokens, device=self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step_index += 1
        self.skipped_updates_total += skipped

        metrics = {f"loss/{k}": v / agg_tokens for k, v in agg.items()} if agg_tokens else {}
        metrics.update({f"loss/{k}": v for k, v in agg_max.items()})
        # Tokens that received this method's loss (0 when e.g. no SDPO group had a success):
        # the loss terms above are token-weighted means over exactly these.
        metrics["loss/target_tokens"] = float(agg_tokens)
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
        correct = correct_mask(rewards)
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if B > 1 else 0.0,
            "groups/mixed_fraction": float(sum(1 for g in groups if len({s.reward for s in g.samples}) > 1) / len(groups)),
            "length/mean": float(lengths.mean()),
            "length/max": float(lengths.max()),
            "length/correct_mean": float(lengths[correct.cpu()].mean()) if bool(correct.any()) else 0.0,
            "optim/lr": float(lr),
            "optim/lambda": float(lam),
            "optim/grad_norm": float(sum(grad_norms) / len(grad_norms)) if grad_norms else float("nan"),
            "optim/applied_updates": float(applied),
            "optim/skipped_updates": float(skipped),
            "adv/abs_token_mean": float((tok_adv.abs() * mask).sum() / mask.sum().clamp(min=1)),
            "tokens/trained": float(mask.sum()),
            "time/step_s": time.perf_counter() - t0,
        })
        if track_drift and float(drift[1]) > 0:
            # mean |log π_old − log P_S(teacher service)| over scored tokens: staleness of the
            # teacher's student view (0 when it scored the same weights; fp noise otherwise)
            metrics["rlrt/student_view_drift"] = float(drift[0] / drift[1])
        if teacher_lp is not None and spec.weight is not None and bool(scored.any()):
            # Diagnostics over the rollouts the teacher actually scored (the others have D̂ = 0
            # by construction and would only dilute the signal).
            summary = algorithms.asymmetry_summary(algo.method, advantages, rewards, student_lp, teacher_lp,
                                                   mask & scored[:, None], lam=lam, eps_w=algo.eps_w)
            metrics.update({f"rlrt/{k}": float(v) for k, v in summary.items()})
            metrics["rlrt/scored_fraction"] = float(scored.float().mean())
        metrics["tokens/per_s"] = metrics["tokens/trained"] / max(metrics["time/step_s"], 1e-9)
        return StepResult(metrics=metrics, skipped_updates=skipped, applied_updates=applied)
