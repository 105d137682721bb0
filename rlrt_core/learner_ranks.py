"""Several learner ranks (torchrun): rank 0 leads, the others follow.

Rank 0 runs the whole `LearnerLoop` (Redis, dedupe, staleness filter, publish, announce, ack,
metrics) around a `RankedLearner`, which sends every operation that involves the other ranks
as a command over torch.distributed before doing its own part:

    step         the step's TrainGroups (below); every rank trains its share of the micro-batches
    gather       ZeRO-3 only: enter/leave `full_params` together (publishing the weights)
    checkpoint   save: every rank writes its optimizer shard into rank 0's temporary directory
    restore      resume: every rank loads the checkpoint (and its own shard)
    noop         keep-alive while rank 0 waits for data (followers wait at most dist_timeout_s)
    stop         the run is over: followers exit 0

`follow()` is the other ranks' whole life: receive a command, do it, repeat.

Messages never use pickle (torch's *_object collectives unpickle): a command is an 8-byte
little-endian header length, a JSON header, then a safetensors blob holding the groups' token
ids (int64) and float lists (float64, so values round-trip exactly), broadcast as one uint8
tensor (`rlrt_core.distributed.broadcast_bytes`).

Failure: a rank that dies makes the others' next collective fail (gloo notices the closed
socket; otherwise `learner.dist_timeout_s`). Rank 0 then raises `RankLost`, a BaseException the
loop's retry handlers do not swallow, and the service exits non-zero without checkpointing;
followers exit non-zero too. torchrun (`--max-restarts`) or the launcher restarts all ranks and
the run resumes from the last checkpoint. Any exception inside a step ends the ranks the same
way (the ranks may be mid-collective; per-group isolation needs one rank).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from rlrt_core.distributed import all_ok, broadcast_bytes
from rlrt_core.learner import PolicyLearner, TrainGroup, TrainSample

log = logging.getLogger("rlrt.learner.ranks")

_INT_FIELDS = ("prompt_ids", "response_ids")
_FLOAT_FIELDS = ("behavior_logprobs", "student_logprobs", "teacher_logprobs", "teacher_entropy")
_TENSOR_FIELDS = ("support_ids", "teacher_support_logprobs")


class RankLost(BaseException):
    """A collective with the other learner ranks failed (a rank died or timed out): this process
    must end (non-zero) and be restarted with the others. A BaseException so that the loop's
    retry-on-Exception handlers let it through."""


# -- the wire format of a command ----------------------------------------------------------

def encode(header: dict[str, Any], groups: Sequence[TrainGroup] = ()) -> bytes:
    """A command (JSON header) and optional groups -> bytes (no pickle)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for gi, g in enumerate(groups):
        samples = []
        for si, s in enumerate(g.samples):
            key = f"{gi}.{si}."
            for name in _INT_FIELDS:
                tensors[key + name] = torch.tensor(getattr(s, name), dtype=torch.int64)
            for name in _FLOAT_FIELDS:
                value = getattr(s, name)
                if value is not None:
                    tensors[key + name] = torch.tensor(value, dtype=torch.float64)
            for name in _TENSOR_FIELDS:
                value = getattr(s, name)
                if value is not None:
                    tensors[key + name] = value.detach().cpu().contiguous()
            samples.append({"reward": s.reward})
        meta.append({"group_id": g.group_id, "version": g.version, "samples": samples})
    head = json.dumps({**header, "groups": meta}).encode()
    return struct.pack("<Q", len(head)) + head + (save(tensors) if tensors else b"")


def decode(data: bytes) -> tuple[dict[str, Any], list[TrainGroup]]:
    """Inverse of `encode`: (header, groups)."""
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    rest = data[8 + n:]
    tensors = load(rest) if rest else {}
    groups = []
    for gi, g in enumerate(header.pop("groups", [])):
        samples = []
        for si, s in enumerate(g["samples"]):
            key = f"{gi}.{si}."
            kw: dict[str, Any] = {name: tensors[key + name].tolist() for name in _INT_FIELDS}
            for name in _FLOAT_FIELDS:
                t = tensors.get(key + name)
                kw[name] = t.tolist() if t is not None else None
            for name in _TENSOR_FIELDS:
                kw[name] = tensors.get(key + name)
            samples.append(TrainSample(reward=float(s["reward"]), **kw))
        groups.append(TrainGroup(group_id=g["group_id"], version=int(g["version"]), samples=samples))
    return header, groups


def rank_device(device: str) -> str:
    """`cuda` with several ranks on a node -> this rank's `cuda:<LOCAL_RANK>` (and select it)."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


# -- rank 0 ----------------------------------------------------------------------------

class RankedLearner:
    """Rank 0's `PolicyLearner`: the same interface for `LearnerLoop`, with every operation
    that needs the other ranks preceded by its command. One lock orders commands and the
    keep-alive (collectives must be issued in the same order on every rank)."""

    def __init__(self, learner: PolicyLearner, *, keepalive_s: float | None = None) -> None:
        if learner.ds is None:
            raise ValueError("several learner ranks need learner.deepspeed (ZeRO shards the work across them)")
        self.learner = learner
        self.world_size, self.rank = learner.ranks
        if self.rank != 0:
            raise ValueError(f"RankedLearner runs on rank 0, this is rank {self.rank}; other ranks run follow()")
        self._device = learner.device
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._keepalive_s = keepalive_s or max(1.0, min(30.0, learner.cfg.dist_timeout_s / 4))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="rank-keepalive", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # model, scheduler, temperature, state, ...
        return getattr(self.learner, name)

    def _send(self, header: dict[str, Any], groups: Sequence[TrainGroup] = ()) -> None:
        try:
            broadcast_bytes(encode(header, groups), device=self._device)
        except Exception as err:
            raise RankLost(f"sending {header['cmd']!r} to the other learner ranks failed: {err}") from err
        self._last_send = time.monotonic()

    def _keepalive(self) -> None:
        while not self._closed.wait(self._keepalive_s / 2):
            if time.monotonic() - self._last_send < self._keepalive_s or not self._lock.acquire(blocking=False):
                continue
            try:
                self._send({"cmd": "noop"})
            except RankLost as err:  # the main thread's next command reports it
                log.error("%s", err)
                return
            finally:
                self._lock.release()

    def step(self, groups: Sequence[TrainGroup]) -> Any:
        with self._lock:
            self._send({"cmd": "step"}, groups)
            try:
                return self.learner.step(groups)
            except Exception as err:
                raise RankLost(f"training step failed on rank 0 ({type(err).__name__}: {err}); the ranks "
                               "may be mid-collective, so all of them stop and resume from the last checkpoint") from err

    @contextlib.contextmanager
    def full_params(self, *, modify: bool = False) -> Iterator[None]:
        if self.learner.ds.stage != 3:  # stages 0-2 hold full weights on every rank: nothing to share
            with self.learner.full_params(modify=modify):
                yield
            return
        with self._lock:
            self._send({"cmd": "gather", "modify": modify})
            try:
                ctx = self.learner.full_params(modify=modify)
                ctx.__enter__()
            except Exception as err:
                raise RankLost(f"gathering the weights failed: {err}") from err
            try:
                yield
            finally:
                ctx.__exit__(None, None, None)

    def save_checkpoint(self, root: str | os.PathLike[str], **kw: Any) -> Path:
        """Every rank writes its optimizer shard into the checkpoint's temporary directory (the
        checkpoint directory must be on storage every rank sees: one node, or a shared volume)."""
        done = {"shards": False}

        def shards(tmp: Path) -> None:
            self._send({"cmd": "shards", "dir": str(tmp)})
            ok = True
            try:
                self.learner.ds.write_shard(tmp)
            except Exception:
                log.exception("writing rank 0's optimizer shard failed")
                ok = False
            try:
                everyone = all_ok(ok, device=self._device)
            except Exception as err:
                raise RankLost(f"the ranks did not confirm their optimizer shards: {err}") from err
            done["shards"] = True
            if not everyone:
                raise OSError(f"a learner rank could not write its optimizer shard into {tmp}")

        with self._lock:
            self._send({"cmd": "checkpoint"})
            try:
                return self.learner.save_checkpoint(root, write_shards=shards, **kw)
            except Exception as err:
                if done["shards"]:  # the ranks are done with this checkpoint: a local failure, retried
                    raise
                raise RankLost(f"checkpoint failed before every rank had written its shard: {err}") from err

    def restore(self, path: str | os.PathLike[str]) -> Any:
        with self._lock:
            self._send({"cmd": "restore", "path": str(path)})
            try:
                return self.learner.restore(path)
            except Exception as err:
                raise RankLost(f"restoring {path} failed on rank 0: {err}") from err

    def close(self, *, stop_followers: bool = True) -> None:
        """End the keep-alive; tell the followers the run is over (they exit 0)."""
        self._closed.set()
        self._thread.join(timeout=5)
        if not stop_followers:
            return
        # A keep-alive stuck on a dead peer holds the lock until dist_timeout_s: do not wait for it.
        if not self._lock.acquire(timeout=10.0):
            log.warning("the other ranks are not answering; not sending them stop")
            return
        try:
            self._send({"cmd": "stop"})
        except RankLost as err:
            log.warning("could not tell the other ranks to stop: %s", err)
        finally:
            self._lock.release()


# -- ranks 1..W-1 ----------------------------------------------------------------------

def follow(learner: PolicyLearner) -> int:
    """A follower rank's life: do what rank 0 commands until `stop` (returns 0); a failed
    collective or step returns 1 (the launcher restarts every rank)."""
    world, rank = learner.ranks
    device = learner.device
    # SIGTERM/Ctrl-C reach every rank at once; rank 0 finishes the run (a final checkpoint needs
    # us) and then sends stop. If rank 0 is gone instead, our next collective fails.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: log.info("rank %d: signal %d; waiting for rank 0 to stop the run", rank, s))
    log.info("rank %d of %d following rank 0", rank, world)
    pending: tuple[dict[str, Any], list[TrainGroup]] | None = None
    steps = 0
    try:
        while True:
            header, groups = pending or decode(broadcast_bytes(None, device=device))
            pending = None
            cmd = header.get("cmd")
            if cmd == "step":
                learner.step(groups)
                steps += 1
            elif cmd == "gather":
                with learner.full_params(modify=bool(header["modify"])):
                    pass
            elif cmd == "checkpoint":
                with learner.full_params():
                    nxt = decode(broadcast_bytes(None, device=device))
                    if nxt[0].get("cmd") == "shards":
                        ok = True
                        try:
                            learner.ds.write_shard(header_dir := nxt[0]["dir"])
                        except Exception:
                            log.exception("rank %d: writing the optimizer shard into %s failed", rank, header_dir)
                            ok = False
                        all_ok(ok, device=device)
                    else:  # rank 0 gave up on this checkpoint before the shards (and retries)
                        pending = nxt
            elif cmd == "restore":
                learner.restore(header["path"])
            elif cmd == "noop":
                continue
            elif cmd == "stop":
                log.info("rank %d: stop after %d steps", rank, steps)
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r} from rank 0")
    except Exception:
        log.exception("rank %d: lost the other ranks or failed a command; exiting for a restart", rank)
        return 1


def follower_main(cfg: Any) -> int:
    """Ranks 1..W-1 of `rlrt serve learner` under torchrun: build the same learner as rank 0
    (the DeepSpeed engine's set-up is itself collective) and follow rank 0 until stop."""
    from rlrt_core.models import load_model

    lc = cfg.learner
    torch.manual_seed(lc.seed)
    device = rank_device(lc.device)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=device, cache_dir=cfg.model.cache_dir)
    try:
        learner = PolicyLearner(model, lc, cfg.algorithm, temperature=cfg.rollout.temperature, device=device)
    except Exception:
        log.exception("rank %s: building the DeepSpeed engine failed", os.environ.get("RANK"))
        return 1
    return follow(learner)
