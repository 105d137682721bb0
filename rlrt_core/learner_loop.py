"""The learner's loop: dispatch under admission, collect, train, commit, checkpoint, recover.

One `round()`, in order (the service calls it until `done`):

  1. recover    Redis lost its data (the run's marker key is gone)? re-create the consumer
                groups, re-announce the current version, re-dispatch every outstanding group
                Redis no longer holds (the ledger knows them; same ids)
  2. account    follow the dead-letter stream: groups another stage dead-lettered leave the
                ledger as `dead`; admission's in-flight count = the ledger's outstanding
  3. dispatch   while in flight < (max_staleness + 1) x groups_per_step, publish PromptTasks
                with min_version = the current version (always already announced)
  4. collect    consume `scored` (each entry validated alone: a bad one is dead-lettered with
                its reason); drop duplicates and groups whose lag exceeds max_staleness
  5. train      once groups_per_step groups are buffered: PolicyLearner.step
  6. commit     serve version v+1, announce it, ack the batch, append the metrics row — each
                side effect retried until it succeeds (the step's counters move only then),
                so a Redis blip can delay a step but never lose or repeat one
  7. checkpoint every N steps (atomic; the ledger, cursor and counters go with it)
  8. sample     every `metrics.sample_every` steps: a bounded sample of the step's scored
                rollouts (tokens, D̂_t, D̄_t top-k estimate, rewards) in RUN_DIR/samples
                (`rlrt_core.samples`, read by `rlrt explore`)

Resume: the newest checkpoint gives weights, optimizer, ledger, cursor and counters;
metrics rows of steps after it are dropped (they are re-trained), versions continue above any
announced after it, and outstanding groups that Redis no longer holds (acked by the dead
learner after its checkpoint) are re-dispatched: no acked-but-untrained group survives a crash.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlrt_core import heap
from rlrt_core.checkpoint import latest_checkpoint
from rlrt_core.config import RunConfig, check_in_flight_bound
from rlrt_core.failpoints import failpoint
from rlrt_core.learner import PolicyLearner, TrainGroup, train_group
from rlrt_core.ledger import GroupLedger
from rlrt_core.metrics import RateWindow, read_metrics_rows  # noqa: F401 - re-exported
from rlrt_core.proto import trajectory_pb2 as pb
from rlrt_core.samples import SampleSource, SampleWriter, build_step_sample, sample_source
from rlrt_core.stages import DISPATCH_STREAM, stage
from rlrt_core.staleness import AdmissionController
from rlrt_core.transport.codec import Limits, prompt_task

log = logging.getLogger("rlrt.learner")


class StopRequested(Exception):
    """The loop was asked to stop while a step's side effects were still being retried."""


class ProblemCursor:
    """Deterministic pass over the data set, reshuffled every epoch; resumable."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> int:
        if self.index >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm()
        i = self._order[self.index]
        self.index += 1
        return i

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def export_step(m: Any, row: dict[str, Any], lags: list[int], rate: RateWindow) -> None:
    """One learner step's metrics.jsonl row -> Prometheus gauges/counters/histograms."""
    def g(key: str, default: float = 0.0) -> float:
        v = row.get(key, default)
        return float(v) if isinstance(v, (int, float)) else default

    m.step.set(row["step"])
    m.loss.set(g("loss/loss"))
    m.reward_mean.set(g("reward/mean"))
    m.mixed_groups.set(g("groups/mixed_fraction"))
    m.response_length.set(g("length/mean"))
    if "loss/entropy" in row:
        m.entropy.set(g("loss/entropy"))
    m.grad_norm.set(g("optim/grad_norm"))
    m.learning_rate.set(g("optim/lr"))
    m.mixing_lambda.set(g("optim/lambda"))
    m.clipped.labels(bound="low").set(g("loss/clip_frac_low"))
    m.clipped.labels(bound="high").set(g("loss/clip_frac_high"))
    m.clipped.labels(bound="dual").set(g("loss/dual_clip_frac"))
    m.is_weight_mean.set(g("loss/is_weight_mean", 1.0))
    m.is_weight_max.set(g("loss/is_weight_max", 1.0))
    m.is_truncated.set(g("loss/is_truncated_frac"))
    m.upweighted.set(g("rlrt/upweighted_frac"))
    for lag in lags:
        m.staleness.observe(lag)
    m.skipped_nonfinite.inc(g("optim/skipped_updates"))
    m.trained_groups.inc(len(lags))
    m.trained_tokens.inc(g("tokens/trained"))
    m.learner_tokens_per_second.set(rate.add(g("tokens/trained")))
    m.step_seconds.observe(g("time/step_s"))


class LearnerLoop:
    """See the module docstring. Collaborators are passed in, so the loop is testable:

    bus: a `StreamBus`; weights: an object with `publish(version, state_dict)` (the
    `WeightServer`); announce(version): records the version (and where it is served) on
    Redis; read_announced() -> the announced version or None; metrics: `LearnerMetrics` or
    None; on_progress() / on_wait(what | None): health reporting; stop: set to end the loop;
    tokenizer: decodes the text pieces of sampled rollouts (None: samples carry token ids only).
    """

    def __init__(self, cfg: RunConfig, learner: PolicyLearner, problems: Sequence[Any], *, bus: Any,
                 weights: Any, announce: Callable[[int], None], read_announced: Callable[[], int | None],
                 worker: str, vocab_size: int | None = None, metrics: Any = None,
                 on_progress: Callable[[], None] = lambda: None,
                 on_wait: Callable[[str | None], None] = lambda _w: None,
                 stop: threading.Event | None = None, tokenizer: Any = None) -> None:
        self.cfg, self.lc, self.algo = cfg, cfg.learner, cfg.algorithm
        self.learner, self.model = learner, learner.model
        self.problems = list(problems)
        self._problem_index = {getattr(p, "id", str(i)): i for i, p in enumerate(self.problems)}
        self.bus, self.weights, self._announce, self._read_announced = bus, weights, announce, read_announced
        self.worker, self.m = worker, metrics
        self.on_progress, self.on_wait = on_progress, on_wait
        self.stop = stop or threading.Event()
        self.stage = stage("learner")
        self.run_dir = Path(cfg.metrics.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.limits = Limits(vocab_size=vocab_size, max_model_len=cfg.model.max_model_len)
        self.admission = AdmissionController(max_staleness=self.lc.max_staleness, groups_per_step=self.lc.groups_per_step)
        self.ledger = GroupLedger()
        self.cursor = ProblemCursor(len(self.problems), seed=cfg.data.shuffle_seed)
        self.totals: Counter = Counter()
        self.version = 0
        self.step = 0
        self.ckpt_step = 0
        self.buffer: list[tuple[Any, TrainGroup, float | None]] = []  # (entry, group, mean D̄_t)
        self.to_redispatch: list[str] = []
        self.waiting_since = time.time()
        self.rate = RateWindow()
        self._dead_cursor = "0-0"
        self._marker = f"{cfg.transport.stream_prefix}:{cfg.run_name}:learner-epoch"
        self._epoch = uuid.uuid4().hex
        self._next_audit = 0.0
        # Control state written by the admin thread, applied by the loop at the start of a round.
        self._lock = threading.Lock()
        self._paused = False
        self._checkpoint_requested = False
        mc = cfg.metrics
        self.samples = SampleWriter(self.run_dir, every=mc.sample_every, max_rollouts=mc.sample_rollouts,
                                    keep=mc.sample_keep)
        self._sample_src: dict[str, SampleSource] = {}  # buffered group id -> what its TrainGroup drops
        self._tokenizer = tokenizer

    # -- admin actions (any thread) ------------------------------------------------------
    def pause(self, paused: bool) -> None:
        with self._lock:
            self._paused = paused

    def request_checkpoint(self) -> int:
        with self._lock:
            self._checkpoint_requested = True
            return self.step

    def set_max_staleness(self, max_staleness: int) -> int:
        """Change the bound at run time; ValueError when (s + 1) x groups_per_step would not
        fit in `transport.stream_maxlen` (dispatch could never proceed)."""
        check_in_flight_bound(max_staleness, self.lc.groups_per_step, self.cfg.transport.stream_maxlen)
        with self._lock:
            self.admission.set_max_staleness(max_staleness)
            return self.admission.max_staleness

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.version, "step": self.step, "total_steps": self.lc.total_steps,
                    "processed": self.totals["trained_groups"], "in_flight": self.admission.in_flight,
                    "max_staleness": self.admission.max_staleness, "paused": self._paused,
                    "buffered": len(self.buffer), "counters": dict(self.totals),
                    "ledger": {**self.ledger.counts, "outstanding": len(self.ledger.outstanding)}}

    @property
    def done(self) -> bool:
        return self.step >= self.lc.total_steps

    # -- retrying side effects -----------------------------------------------------------
    def _until_done(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` until it succeeds, backing off; report what we wait for meanwhile."""
        delay = 0.5
        while True:
            try:
                out = fn()
                self.on_wait(None)
                return out
            except Exception as err:
                if self.m is not None:
                    self.m.errors.labels(kind="commit").inc()
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(err).__name__, err, delay)
                self.on_wait(what)
                if self.stop.wait(delay):
                    raise StopRequested(what) from err
                delay = min(delay * 2, 10.0)

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the newest checkpoint (or start fresh), publish and announce the
        current version, and reconcile the ledger with what Redis holds."""
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is not None:
            loaded = self.learner.restore(ck)  # weights, optimizer (every rank's shard), scheduler, counters
            extra = loaded.state.get("extra", {})
            self.admission.load_state_dict(extra.get("admission", {}))
            self.ledger.load_state_dict(extra.get("ledger", {}))
            c = extra.get("cursor", {})
            self.cursor = ProblemCursor(len(self.problems), seed=self.cfg.data.shuffle_seed,
                                        epoch=c.get("epoch", 0), index=c.get("index", 0))
            self.totals.update(extra.get("totals", {}))
            self._dead_cursor = extra.get("dead_cursor", "0-0")
            self.version, self.step = loaded.version, loaded.step
            self._truncate_metrics(self.step)
            self.samples.drop_after(self.step)  # those steps are re-trained (and re-sampled)
            log.info("resumed from %s: step %d, version %d", ck, loaded.step, loaded.version)
        else:
            # A fresh run: forget streams, dedupe sets, announcements and service records an
            # earlier run of the same name left in this Redis.
            removed = self._until_done("Redis to clear the run's old keys", self.bus.delete_run)
            if removed:
                log.info("fresh run: removed %d stale Redis keys of run %r", removed, self.cfg.run_name)
        self._until_done("Redis to create the consumer groups", self.bus.ensure_groups)
        if ck is not None:
            # Versions only move forward: versions the old process announced after its last
            # checkpoint named weights that are lost, so the resumed policy takes the next id.
            announced = self._until_done("Redis to read the announced version", self._read_announced)
            if announced is not None and announced >= self.version + 1:
                log.info("versions %d..%d were announced after the checkpoint; continuing at %d",
                         self.version + 1, announced, announced + 1)
                self.version = announced + 1
        self._publish(self.version)
        self._until_done(f"Redis to announce weight version {self.version}", lambda: self._announce(self.version))
        self._until_done("Redis to record the learner epoch", self._set_marker)
        if ck is not None:
            self._reconcile("resume")
        self.ckpt_step = self.step
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows of steps after `step` (they were lost with the process and are re-trained)."""
        rows = read_metrics_rows(self.metrics_path)
        kept = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(kept) != len(rows):
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.metrics_path)
            log.info("metrics.jsonl: dropped %d rows of steps after %d", len(rows) - len(kept), step)

    def _publish(self, version: int) -> None:
        t0 = time.perf_counter()
        # The weight server copies each tensor once, from any device, into its version
        # buffer: hand it the parameters themselves (a `.to("cpu")` here staged a GPU model
        # through a second full host copy).
        with self.learner.full_params():
            # Straight from the (gathered) parameters into the version buffer, cast to the
            # engines' dtype on that one copy: no full-size CPU staging copy.
            self.weights.publish(version, self.model.state_dict(), dtype=self.cfg.weights_publish_dtype())
        if self.m is not None:
            self.m.learner_weight_version.set(version)
            self.m.weight_publish_seconds.observe(time.perf_counter() - t0)

    # -- recovery ------------------------------------------------------------------------
    def _set_marker(self) -> None:
        self.bus.client.set(self._marker, self._epoch)

    def _marker_lost(self) -> bool:
        return self.bus.client.get(self._marker) is None

    def _recover_lost_data(self) -> None:
        log.error("Redis lost this run's data (restart without persistence?): re-creating groups, "
                  "re-announcing version %d and re-dispatching the groups it held", self.version)
        self.totals["redis_data_losses"] += 1
        self.bus.ensure_groups()
        self._announce(self.version)
        self._set_marker()
        self._dead_cursor = "0-0"
        self._reconcile("redis data loss")

    def _reconcile(self, why: str) -> None:
        """Re-dispatch outstanding groups that neither Redis nor our buffer holds."""
        self._follow_dead_letters()
        present = self.bus.in_flight_ids() | {tg.group_id for _, tg, _ in self.buffer}
        missing = self.ledger.missing(present)
        if missing:
            log.warning("%s: %d outstanding group(s) are no longer in Redis; re-dispatching them", why, len(missing))
            self.to_redispatch.extend(g for g in missing if g not in self.to_redispatch)

    def _audit(self) -> None:
        """Cheap check for partial data loss (e.g. the last second of an AOF): when fewer
        entries are in flight than the ledger has outstanding, find and re-send the lost ones."""
        now = time.time()
        if now < self._next_audit:
            return
        self._next_audit = now + 30.0
        outstanding = len(self.ledger.outstanding) - sum(self.ledger.knows(tg.group_id) for _, tg, _ in self.buffer)
        if outstanding - len(self.to_redispatch) > self.bus.backlog():
            self._reconcile("audit")

    def _follow_dead_letters(self) -> None:
        for d in self.bus.dead_letters_after(self._dead_cursor):
            self._dead_cursor = d.id
            if d.gid and self.ledger.dead(d.gid):
                self.totals["dead"] += 1
                log.warning("group %s was dead-lettered by %s: %s", d.gid, d.group or d.source, d.reason)

    # -- one round -----------------------------------------------------------------------
    def round(self) -> bool:
        """One pass of the loop (see module docstring); True when work was done."""
        if self.done:
            return False
        if self._marker_lost():
            self._recover_lost_data()
        self._follow_dead_letters()
        self._audit()
        with self._lock:
            paused, want_ckpt = self._paused, self._checkpoint_requested
            self.admission.reconcile(len(self.ledger.outstanding))
        dispatched = 0 if paused else self._dispatch()
        got = self._collect()
        if want_ckpt and len(self.buffer) < self.lc.groups_per_step:
            self._checkpoint()
        if len(self.buffer) >= self.lc.groups_per_step:
            self._train_step()
            return True
        if self.m is not None:
            self.m.inflight_groups.set(self.admission.in_flight)
        if self.buffer:  # keep buffered entries ours while we wait for the rest of the batch
            self.bus.touch([e for e, _, _ in self.buffer])
        return got or dispatched > 0

    def _dispatch(self) -> int:
        room = self.bus.room(DISPATCH_STREAM)
        if self.to_redispatch and room:
            take, self.to_redispatch = self.to_redispatch[:room], self.to_redispatch[room:]
            take = [g for g in take if self.ledger.knows(g)]
            tasks = [self._task(g, self.ledger.outstanding[g].problem) for g in take]
            if tasks:
                # Same ids: drop them from the done-set first (they were trained by weights that
                # were lost), atomically with the new entries.
                done_key = self.bus.done_key(self.stage.group)
                self.bus.publish_many(DISPATCH_STREAM, tasks, pre=lambda pipe: pipe.srem(done_key, *take))
                for g in take:
                    self.ledger.redispatched(g, self.version)
                self.totals["redispatched"] += len(take)
                room -= len(tasks)
        # Partial dispatch when the stream is nearly full: never all-or-nothing.
        n = min(self.admission.can_dispatch(), room)
        if n <= 0:
            return 0
        chosen = [(f"{self.cfg.run_name}-v{self.version}-{uuid.uuid4().hex[:12]}", self.cursor.next())
                  for _ in range(n)]
        self.bus.publish_many(DISPATCH_STREAM, [self._task(gid, i) for gid, i in chosen])
        for gid, i in chosen:
            self.ledger.dispatched(gid, i, self.version)
        self.admission.on_dispatched(n)
        return n

    def _task(self, gid: str, problem_index: int) -> pb.PromptTask:
        return prompt_task(gid, self.cfg.run_name, self.problems[problem_index], n_samples=self.cfg.rollout.n_samples,
                           min_version=self.version)

    def _collect(self) -> bool:
        st = self.stage
        limits = Limits(vocab_size=self.limits.vocab_size, max_model_len=self.limits.max_model_len,
                        max_version=self.version)
        pairs = self.bus.consume_messages(st.input, st.group, self.worker, st.message, count=self.lc.groups_per_step,
                                          block_ms=min(self.cfg.transport.block_ms, 500), limits=limits)
        done_before = self.bus.seen([g.group_id for _, g in pairs], group=st.group) if pairs else []
        buffered = {tg.group_id: e.id for e, tg, _ in self.buffer}
        for (e, g), trained in zip(pairs, done_before):
            if buffered.get(g.group_id) == e.id:  # re-read after an error: already buffered
                continue
            if trained or g.group_id in buffered:  # never train on a group twice
                self.bus.ack(e)
                self.totals["duplicates"] += 1
                continue
            try:
                tg = train_group(g)
            except ValueError as err:
                self.bus.dead_letter(e, f"learner: {err}", kind="bad_rollout_group")
                self.ledger.dead(g.group_id)
                self.totals["dead"] += 1
                continue
            if not self.ledger.knows(g.group_id):
                self.ledger.adopt(g.group_id, self._problem_index.get(g.problem.id, 0), g.min_version)
                self.totals["adopted"] += 1
            if self.admission.is_stale(tg.version, self.version):
                self._drop(e, tg)
                continue
            kls = [sc.position_kl_mean for sc in g.teacher_scores if len(sc.position_kl)]
            self.buffer.append((e, tg, sum(kls) / len(kls) if kls else None))
            if self.samples.every:
                self._sample_src[tg.group_id] = sample_source(g)
            buffered[tg.group_id] = e.id
            self.on_progress()  # taking work in is progress too (a long step follows)
        # Buffered groups age by one version per step: filter them again before training.
        kept = []
        for e, tg, kl in self.buffer:
            if self.admission.is_stale(tg.version, self.version):
                self._drop(e, tg)
            else:
                kept.append((e, tg, kl))
        self.buffer = kept
        return bool(pairs)

    def _drop(self, e: Any, tg: TrainGroup) -> None:
        self._sample_src.pop(tg.group_id, None)
        self.bus.ack(e, dedupe_id=tg.group_id)
        self.ledger.dropped(tg.group_id)
        self.admission.on_dropped(1, lag=self.version - tg.version)
        self.totals["dropped_stale"] += 1
        if self.m is not None:
            self.m.dropped_stale.inc()

    # -- training and committing -----------------------------------------------------------
    def _train_step(self) -> None:
        G = self.lc.groups_per_step
        batch = self.buffer[:G]
        wait_s = time.time() - self.waiting_since
        groups = [tg for _, tg, _ in batch]
        lags = [self.version - tg.version for tg in groups]
        try:
            res = self.learner.step(groups)
        except Exception as err:
            if not self._isolate(batch, err):
                raise
            return
        new_step, new_version = self.step + 1, self.version + 1
        failpoint("learner.after_train", step=new_step)
        # Commit: every side effect retried until it succeeds; counters move only at the end.
        self._publish(new_version)
        failpoint("learner.before_announce", step=new_step)
        self._until_done(f"Redis to announce weight version {new_version}", lambda: self._announce(new_version))
        self._until_done(f"Redis to acknowledge the {len(batch)} groups of step {new_step}",
                         lambda: self.bus.ack_many([e for e, _, _ in batch], dedupe_ids=[tg.group_id for tg in groups]))
        d_bar = [x for _, _, x in batch if x is not None]
        with self._lock:
            for tg in groups:
                self.ledger.trained(tg.group_id)
            self.admission.on_consumed(len(batch))
            self.buffer = self.buffer[G:]
            self.totals["trained_groups"] += len(batch)
            self.totals["skipped_updates_total"] += res.skipped_updates
            self.step, self.version = new_step, new_version
        row = {"step": new_step, "version": new_version, "method": self.algo.method, "time": time.time(),
               **res.metrics, "staleness/mean": sum(lags) / len(lags), "staleness/max": max(lags),
               "staleness/hist": dict(Counter(lags)), "time/wait_data_s": wait_s,
               "dropped_stale_total": self.totals["dropped_stale"],
               "skipped_updates_total": self.totals["skipped_updates_total"],
               "duplicates_total": self.totals["duplicates"], "in_flight": self.admission.in_flight,
               "groups": [tg.group_id for tg in groups]}
        if d_bar:
            row["rlrt/position_kl_mean"] = sum(d_bar) / len(d_bar)
        self._until_done("the metrics file to accept step " + str(new_step), lambda: self._append_row(row))
        if self.m is not None:
            self.m.data_wait_seconds.observe(wait_s)
            export_step(self.m, row, lags, self.rate)
        self._sample_step(new_step, new_version, groups)
        self.waiting_since = time.time()
        self.on_progress()
        log.info("step %d v%d reward %.3f len %.1f loss-clip %.3f (%.1fs, waited %.1fs)", new_step, new_version,
                 row["reward/mean"], row["length/mean"], row.get("loss/clip_frac", 0.0), row["time/step_s"], wait_s)
        with self._lock:
            requested = self._checkpoint_requested
        if (self.lc.checkpoint_every and new_step % self.lc.checkpoint_every == 0) or self.done or requested:
            self._checkpoint()
        # The step's activations and gradients (and a checkpoint's copies) are free now; glibc
        # keeps them in its heap unless asked (rlrt_core.heap): ~1 GB on the demo's model.
        heap.trim()
        rss, peak = heap.rss_mib()
        log.info("memory after step %d: RSS %.0f MiB, peak %.0f MiB", new_step, rss, peak)

    def _sample_step(self, step: int, version: int, groups: list[TrainGroup]) -> None:
        """Write the step's sample when due; a sample is a diagnostic: a failure is logged, never
        retried, and never holds training up."""
        sources = {tg.group_id: self._sample_src.pop(tg.group_id) for tg in groups if tg.group_id in self._sample_src}
        if not self.samples.due(step):
            return
        try:
            doc = build_step_sample(step, version, self.algo.method, groups, sources,
                                    max_rollouts=self.samples.max_rollouts,
                                    decode=self._decode if self._tokenizer is not None else None,
                                    topk=self.cfg.teacher.topk)
            path = self.samples.write(doc)
            self.totals["samples_written"] += 1
            log.info("step %d: sample of %d rollouts in %s", step, len(doc["rollouts"]), path)
        except Exception as err:
            self.totals["samples_failed"] += 1
            log.warning("step %d: sample not written (%s: %s)", step, type(err).__name__, err)

    def _decode(self, ids: list[int]) -> list[str]:
        # One piece per id, exactly as decoded (no clean-up of spaces around punctuation).
        return self._tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)

    def _isolate(self, batch: list, err: Exception) -> bool:
        """A step failed: score each group alone to find the ones at fault, dead-letter them
        with the error, keep the rest buffered. False when no single group is to blame."""
        from rlrt_core.scoring import score_tokens

        culprits = []
        for e, tg, _ in batch:
            try:
                with torch.no_grad():
                    score_tokens(self.model, [s.prompt_ids for s in tg.samples], [s.response_ids for s in tg.samples],
                                 temperature=self.learner.temperature, grad=False)
            except Exception as own:
                culprits.append((e, tg, own))
        if not culprits:
            return False
        for e, tg, own in culprits:
            self._sample_src.pop(tg.group_id, None)
            self.bus.dead_letter(e, f"learner: group {tg.group_id!r} breaks the training step: "
                                    f"{type(own).__name__}: {own}", kind="training_failed")
            self.ledger.dead(tg.group_id)
            self.totals["dead"] += 1
        bad = {id(e) for e, _, _ in culprits}
        self.buffer = [b for b in self.buffer if id(b[0]) not in bad]
        log.error("training step failed (%s); dead-lettered %d group(s) that fail alone", err, len(culprits))
        return True

    def _append_row(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _checkpoint(self) -> None:
        with self._lock:
            self._checkpoint_requested = False
            extra = {"learner": self.learner.state(), "admission": self.admission.state_dict(),
                     "cursor": self.cursor.state(), "totals": dict(self.totals), "ledger": self.ledger.state_dict(),
                     "dead_cursor": self._dead_cursor}
        t0 = time.perf_counter()

        def write() -> Path:
            return self.learner.save_checkpoint(self.ckpt_dir, step=self.step, version=self.version, extra=extra,
                                                keep=self.lc.keep_checkpoints,
                                                before_commit=lambda: failpoint("learner.checkpoint_write",
                                                                                step=self.step))

        path = self._until_done(f"checkpoint of step {self.step} to be written", write)
        if self.m is not None:
            self.m.checkpoint_seconds.observe(time.perf_counter() - t0)
        self.ckpt_step = self.step
        log.info("checkpoint %s", path)

    def finish(self) -> None:
        """On a graceful stop: keep the progress made since the last checkpoint."""
        if self.step > self.ckpt_step:
            self._checkpoint()
