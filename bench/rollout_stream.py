"""Streaming rollouts vs batch-synchronous, on a long-tailed workload, side by side.

Workload: SmolLM2-135M-Instruct (fp32), P prompts alternating arithmetic ("What is a + b? Reply
with only the number.", 2-digit operands, + or *, seed 0) and GSM8K test questions ("solve step by
step"), the first P/2 of each list in order (no selection by outcome), K samples each, temperature 1.
Their natural lengths spread widely: at T = 1 an arithmetic group's samples end anywhere between a
dozen tokens and the cap (most short, one or two run to `max_new_tokens`), a GSM8K group's mostly
run to the cap; the bench prints the measured per-sample length distribution and how long each
group's samples are against its slowest one (what a batch-synchronous engine waits for). Every mode
generates the same prompts:

* batch      `TorchEngine.generate` on G prompts at a time (what `rollout.streaming: false` does);
             a batch's groups are published when its slowest completion ends.
* stream     `TorchEngine.start_stream()` with a budget of G x K rows (the service's admission
             rule): a new group is admitted between decode steps whenever K rows are free (a
             sample that ended frees its row while its group waits for its slowest sample); a
             group is published as soon as its K completions end.
* service    the real rollout worker (`rlrt serve rollout`, streaming, G x K rows) fed over Redis;
             the same group ids and seeds as `stream`, so the same tokens (up to float rounding).
* service-batch  the same worker with `rollout.streaming: false` (G groups per generate call).
* stepcost   CPU time of one decode step against rows x KV-cache width (left-padded rows), the
             cost model behind the stream's figures.
* ab         overhead check on identical work: `generate([p])` vs a stream holding only that
             group (same seed, so the same tokens), interleaved twice; tokens per CPU-s of each.
* teacher    teacher scoring of the same groups (K completions sampled once by vLLM, rewards
             alternating so RLRT-all scores all of them, the reference solution or a peer as
             context): `score_group` with the torch scorer vs vLLM prompt log-probs with prefix
             caching (`teacher.engine: vllm`), torch, vllm, torch, vllm; scored tokens/s (each
             token under both views), CPU seconds of the bench process and its children (vLLM's
             engine and worker), the prefix-cache hit fraction and the largest |torch - vLLM|
             log-prob. Needs vLLM: run it from .venv-vllm.

Figures: generated tokens/s (EOS included) per wall second and per CPU second of the generating
process (one torch thread, so CPU seconds measure work even when other jobs share the cores;
the service's include its Redis and gRPC work), time to the first published group, mean live rows
per decode step over the G x K slots (slot occupancy: what continuous batching improves), for the
stream the mean KV-cache width per decode step and the CPU time spent merging admitted groups into
the live cache (left-padding to the widest row) (the raw
engine modes are busy 100% of the time by construction), and for the service the engine busy
fraction (time inside engine calls / wall time, from its /status) and tokens/s against the
raw engine in the same mode.

    .venv/bin/python bench/rollout_stream.py [--prompts 8 --groups 4 --samples 8 --max-new-tokens 256]
        [--modes batch,stream,service,service-batch] [--model smollm2-135m-instruct | tiny] [--repeats 3]
    .venv-vllm/bin/python bench/rollout_stream.py --modes teacher [--teacher-topk 0]
    .venv-vllm/bin/python bench/rollout_stream.py --engine vllm [--modes batch,stream,service,service-batch]

`--engine vllm` runs batch / stream / service on `VLLMEngine` (generate vs `start_stream()`); CPU
seconds then count the bench process and its children (vLLM's engine core and worker).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m-instruct"
SHORT = "Reply with only the number."
LONG = "Solve the problem step by step. End with the final answer as a number."


def problems(n: int) -> list:
    from rlrt_core.data import arithmetic_problems, load_jsonl

    short = arithmetic_problems(digits=2, ops=["+", "*"], num_problems=n, seed=0, instruction=SHORT)
    long = load_jsonl(REPO / "data" / "gsm8k" / "gsm8k_test.jsonl", format="gsm8k", instruction=LONG,
                      max_problems=n)
    return [(short if i % 2 == 0 else long)[i // 2] for i in range(n)]


def run_batch(engine, prompts, gids, args) -> dict:
    from rlrt_core.engines import SamplingParams, derive_seed

    t0, c0 = time.perf_counter(), _tree_cpu_seconds(os.getpid())
    first, tokens, steps, groups = None, 0, 0, []
    for i in range(0, len(prompts), args.groups):
        sp = SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, temperature=1.0,
                            seed=derive_seed(args.seed, *gids[i:i + args.groups]))
        res = engine.generate(prompts[i:i + args.groups], sp)
        first = first or time.perf_counter() - t0
        lens = [len(c.token_ids) for r in res for c in r.completions]
        tokens += sum(lens)
        steps += max(lens)  # every live row decodes one token per step
        groups.extend([len(c.token_ids) for c in r.completions] for r in res)
    wall, cpu = time.perf_counter() - t0, _tree_cpu_seconds(os.getpid()) - c0
    return {"mode": "batch", "tokens": tokens, "seconds": wall, "cpu_s": cpu, "first_group_s": first, "steps": steps,
            "lengths": groups}


def run_stream(engine, prompts, gids, args) -> dict:
    from rlrt_core.engines import SamplingParams, derive_seed

    stream = engine.start_stream()
    merge = {"cpu_s": 0.0, "calls": 0}
    if hasattr(stream, "_admit"):  # torch: time the prefill + cache merge of admitted groups
        admit = stream._admit

        def timed_admit(groups):
            c = time.process_time()
            try:
                return admit(groups)
            finally:
                merge["cpu_s"] += time.process_time() - c
                merge["calls"] += 1

        stream._admit = timed_admit
    budget = args.groups * args.samples
    todo = list(zip(gids, prompts))
    t0, c0 = time.perf_counter(), _tree_cpu_seconds(os.getpid())
    first, tokens, steps, inflight, width, groups = None, 0, 0, 0, 0, []
    while todo or inflight:
        # the service's admission rule: a row budget of G x K, a group admitted when K rows are free
        while todo and (stream.rows + args.samples <= budget or not stream.rows):
            gid, p = todo.pop(0)
            stream.add(gid, p, SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, temperature=1.0,
                                              seed=derive_seed(args.seed, gid)))
            inflight += 1
        fin = stream.step()
        steps += 1
        width += getattr(stream, "cache_width", 0)  # torch: columns the next decode step attends over
        for f in fin:
            first = first or time.perf_counter() - t0
            tokens += sum(len(c.token_ids) for c in f.result.completions)
            groups.append([len(c.token_ids) for c in f.result.completions])
            inflight -= 1
    wall, cpu = time.perf_counter() - t0, _tree_cpu_seconds(os.getpid()) - c0
    return {"mode": "stream", "tokens": tokens, "seconds": wall, "cpu_s": cpu, "first_group_s": first, "steps": steps,
            "lengths": groups, "mean_cache_width": width / max(steps, 1), "merge_cpu_s": merge["cpu_s"],
            "merges": merge["calls"]}


def print_lengths(mode: str, groups: list[list[int]], cap: int) -> None:
    """The workload's measured tail: per-sample completion lengths and, per group, its mean sample
    against its slowest (a batch-synchronous engine holds a group's rows until its slowest ends)."""
    lens = sorted(n for g in groups for n in g)
    q = lambda f: lens[min(len(lens) - 1, int(f * len(lens)))]  # noqa: E731
    at_cap = sum(n >= cap for n in lens) / len(lens)
    ratio = sum(sum(g) / len(g) / max(g) for g in groups) / len(groups)
    print(f"{mode}: completion lengths over {len(lens)} samples: min {lens[0]}, p10 {q(0.1)}, p25 {q(0.25)}, "
          f"median {q(0.5)}, p75 {q(0.75)}, p90 {q(0.9)}, max {lens[-1]}, mean {sum(lens) / len(lens):.0f}; "
          f"{at_cap:.0%} at the {cap}-token cap; a group's mean sample is {ratio:.2f} of its slowest")
    print(f"{mode}: per group (sorted sample lengths): " + "; ".join(",".join(map(str, sorted(g))) for g in groups))


def run_step_cost(engine, args) -> None:
    """CPU ms of one decode step (median of 9) for rows x cache width, half the rows left-padded
    over half the width (so the attention mask is not all ones, as in a stream or a batch)."""
    import torch

    m = engine.model
    rows_l = [int(x) for x in args.step_rows.split(",")]
    widths = [int(x) for x in args.step_widths.split(",")]
    print(f"step cost (CPU ms per decode step), rows x cache width {widths}:")
    with torch.no_grad():
        for R in rows_l:
            cells = []
            for W in widths:
                ids = torch.randint(0, 1000, (R, W), generator=torch.Generator().manual_seed(0))
                attn = torch.ones(R, W, dtype=torch.long)
                attn[: R // 2, : W // 2] = 0
                pos = (attn.cumsum(-1) - 1).clamp(min=0)
                out = m(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
                cache, tok, nxt, ts = out.past_key_values, ids[:, -1:], attn.sum(-1), []
                for _ in range(9):
                    attn = torch.cat([attn, attn.new_ones((R, 1))], 1)
                    c = time.process_time()
                    out = m(input_ids=tok, attention_mask=attn, position_ids=nxt[:, None], past_key_values=cache,
                            use_cache=True)
                    ts.append(time.process_time() - c)
                    cache, nxt = out.past_key_values, nxt + 1
                cells.append(sorted(ts)[4] * 1000)
            print(f"  {R} rows: " + ", ".join(f"width {W}: {t:.0f}" for W, t in zip(widths, cells)), flush=True)


def run_ab(engine, prompts, args) -> None:
    from rlrt_core.engines import SamplingParams

    sp = SamplingParams(n=args.samples, max_new_tokens=48, temperature=1.0, seed=7)
    for rep in range(2):
        c0 = time.process_time()
        ref = engine.generate(prompts[1:2], sp)[0]
        ca = time.process_time() - c0
        stream = engine.start_stream()
        stream.add(0, prompts[1], sp)
        c0 = time.process_time()
        while stream.groups:
            for f in stream.step():
                got = f.result
        cb = time.process_time() - c0
        ta, tb = (sum(len(c.token_ids) for c in r.completions) for r in (ref, got))
        same = [c.token_ids for c in ref.completions] == [c.token_ids for c in got.completions]
        print(f"ab rep {rep}: generate {ta} tokens {ta / ca:.1f}/CPU-s, stream {tb} tokens {tb / cb:.1f}/CPU-s, "
              f"same tokens: {same}", flush=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and its live descendants (vLLM's engine core and worker processes)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0.0
    for pid in tree:
        try:
            total += _cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_teacher(probs, args) -> list[dict]:
    """Teacher scoring tokens/s, torch scorer vs vLLM prompt log-probs, on the same groups."""
    from rlrt_core.config import build_config
    from rlrt_core.engines import SamplingParams, make_teacher_engine
    from rlrt_core.methods import get_method
    from rlrt_core.models import load_model
    from rlrt_core.prompts import student_prompt_ids
    from rlrt_core.teacher_scoring import score_group

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cfg = build_config({"model": {"path": args.model}, "algorithm": {"method": "rlrt_all"},
                        "teacher": {"engine": "vllm", "topk": args.teacher_topk}}, use_env=False)
    engine = make_teacher_engine(cfg)
    model = load_model(args.model)
    tok, spec = engine.tokenizer, get_method("rlrt_all")
    prompts = [student_prompt_ids(tok, p.prompt) for p in probs]
    gen = engine.generate(prompts, SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed))
    groups = []
    for p, ids, res in zip(probs, prompts, gen):
        comps = res.completions
        groups.append(dict(prompt_text=p.prompt, prompt_ids=ids, solution=p.solution,
                           completions_token_ids=[c.token_ids for c in comps],
                           completion_texts=[c.text for c in comps],
                           rewards=[float(i % 2 == 0) for i in range(len(comps))]))
    n_tokens = sum(len(t) for g in groups for t in g["completions_token_ids"])
    print(f"teacher: {len(groups)} groups, {n_tokens} completion tokens (each scored under both views), "
          f"context {cfg.teacher.context}, teacher.topk {args.teacher_topk}")

    def score_all(scorer) -> tuple[list, dict]:
        t0, c0 = time.perf_counter(), _tree_cpu_seconds(os.getpid())
        cached = prompt_tokens = 0
        out = []
        for g in groups:
            out.append(score_group(scorer, tok, spec, context=cfg.teacher.context, topk=args.teacher_topk, **g))
            if scorer is engine:  # the teacher-view call of this group
                cached += engine.score_stats["cached_tokens"]
                prompt_tokens += engine.score_stats["prompt_tokens"]
        row = {"mode": "teacher-" + ("vllm" if scorer is engine else "torch"), "tokens": n_tokens,
               "seconds": time.perf_counter() - t0, "cpu_s": _tree_cpu_seconds(os.getpid()) - c0}
        if prompt_tokens:
            row["teacher_view_cached_fraction"] = cached / prompt_tokens
        return out, row

    rows = []
    score_group(model, tok, spec, context=cfg.teacher.context, **groups[0])  # warm-up both
    score_group(engine, tok, spec, context=cfg.teacher.context, **groups[0])
    results = {}
    for scorer in (model, engine, model, engine):
        results[scorer is engine], row = score_all(scorer)
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    gap = 0.0
    for gt, gv in zip(results[False], results[True]):
        for a, b in zip(gt, gv):
            if a is not None and a.scored:
                gap = max(gap, float((a.student_logprobs - b.student_logprobs).abs().max()),
                          float((a.teacher_logprobs - b.teacher_logprobs).abs().max()))
    print(f"max |torch - vLLM| log-prob over both views: {gap:.2e}")
    engine.close()
    return rows


def run_service(probs, gids, args, *, streaming: bool) -> dict:
    """The rollout worker as its own process, fed PromptTasks over Redis; groups read back."""
    import httpx
    import yaml

    from rlrt_core.proto import trajectory_pb2 as pb
    from rlrt_core.transport import codec
    from rlrt_core.transport.streams import StreamBus

    run = f"bench-stream-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="rlrt-bench-"))
    cfg = {"run_name": run, "model": {"path": args.model, "max_model_len": 1024},
           "rollout": {"engine": args.engine, "n_samples": args.samples, "temperature": 1.0,
                       "max_new_tokens": args.max_new_tokens, "streaming": streaming,
                       "max_inflight_groups": args.groups, "groups_per_batch": args.groups, "seed": args.seed},
           "transport": {"redis_url": args.redis_url}, "metrics": {"run_dir": str(tmp)}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / "rollout.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "rollout", "--config",
                             str(tmp / "cfg.yaml"), "--worker", "rollout-0"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    bus = StreamBus.from_url(args.redis_url, run)
    try:
        ep_file = tmp / "services" / "rollout-0.json"
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rollout worker exited: {(tmp / 'rollout.log').read_text()[-2000:]}")
            if ep_file.exists():
                base = f"http://127.0.0.1:{json.loads(ep_file.read_text())['admin_port']}"
                try:
                    if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        bus.ensure_group("rollouts", "bench")

        def collect(n: int, t0: float) -> list[tuple[float, pb.RolloutGroup]]:
            got = []
            while len(got) < n:
                for e, g in bus.consume_messages("rollouts", "bench", "b", pb.RolloutGroup, count=16, block_ms=1000):
                    got.append((time.perf_counter() - t0, g))
                    bus.ack(e)
                if proc.poll() is not None:
                    raise RuntimeError(f"rollout worker exited: {(tmp / 'rollout.log').read_text()[-2000:]}")
            return got

        warm = codec.prompt_task(f"{run}-warm", run, probs[0], n_samples=2, min_version=0)
        bus.publish("prompts", warm)
        collect(1, time.perf_counter())
        busy0 = httpx.get(f"{base}/status", timeout=5).json()["busy_s"]
        c0 = _tree_cpu_seconds(proc.pid)  # with vLLM: its engine core and worker too
        t0 = time.perf_counter()
        for gid, p in zip(gids, probs):
            bus.publish("prompts", codec.prompt_task(gid, run, p, n_samples=args.samples, min_version=0))
        got = collect(len(gids), t0)
        wall = time.perf_counter() - t0
        cpu = _tree_cpu_seconds(proc.pid) - c0
        busy = httpx.get(f"{base}/status", timeout=5).json()["busy_s"] - busy0
        tokens = sum(len(c.token_ids) for _, g in got for c in g.completions)
        return {"mode": "service" if streaming else "service-batch", "tokens": tokens, "seconds": wall, "cpu_s": cpu,
                "first_group_s": min(t for t, _ in got),
                "busy_fraction": busy / wall}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        bus.delete_run()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts, alternating short and long (GSM8K)")
    ap.add_argument("--groups", type=int, default=4, help="G: groups per batch / groups in flight")
    ap.add_argument("--samples", type=int, default=8, help="K completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="batch and stream modes: run them interleaved this many times (the box drifts by ~20%%)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--modes", default="batch,stream,service")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, here and in the service (1: OpenMP threads spinning on a loaded "
                         "2-core box made decoding ~10x slower, see tests/test_engines.py)")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--engine", choices=["torch", "vllm"], default="torch",
                    help="rollout engine of batch / stream / service (vllm: run from .venv-vllm)")
    ap.add_argument("--step-rows", default="1,4,8,16", help="stepcost mode: batch rows")
    ap.add_argument("--step-widths", default="64,256,400", help="stepcost mode: KV-cache widths")
    ap.add_argument("--teacher-topk", type=int, default=0, help="teacher mode: teacher.topk (D̄_t rows)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # `timeout` / Ctrl-C: unwind so the service child is stopped and its Redis keys deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the service process
    import torch

    torch.set_num_threads(args.threads)

    from rlrt_core.engines import SamplingParams, TorchEngine
    from rlrt_core.prompts import student_prompt_ids

    probs = problems(args.prompts)
    gids = [f"bench-{i}" for i in range(len(probs))]
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()}")
    print(f"workload: {len(probs)} prompts (arithmetic/GSM8K alternating) x K={args.samples}, <= {args.max_new_tokens} "
          f"new tokens, T=1.0, G={args.groups} groups per batch / G x K rows in flight, fp32 {args.model}, "
          f"{args.engine} engine")
    rows = {}
    if {"batch", "stream", "ab", "stepcost"} & set(modes):
        if args.engine == "vllm":
            from rlrt_core.engines import VLLMEngine

            engine = VLLMEngine(args.model, max_model_len=1024)
        else:
            engine = TorchEngine(args.model, max_model_len=1024)
        prompts = [student_prompt_ids(engine.tokenizer, p.prompt) for p in probs]
        print(f"prompt lengths: {[len(p) for p in prompts]}")
        engine.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=8, seed=0))  # warm-up
        if "ab" in modes:
            run_ab(engine, prompts, args)
        if "stepcost" in modes:
            run_step_cost(engine, args)
        for rep in range(args.repeats):  # batch, stream, batch, stream, ...: drift hits both alike
            for mode in ("batch", "stream"):
                if mode in modes:
                    fn = run_batch if mode == "batch" else run_stream
                    r = fn(engine, prompts, gids, args)
                    rows[mode if rep == 0 else f"{mode} #{rep + 1}"] = r
                    print("RESULT " + json.dumps(r), flush=True)
        engine.close()  # vLLM: its engine core and worker, before a service starts its own
    for mode in ("service", "service-batch"):
        if mode in modes:
            rows[mode] = run_service(probs, gids, args, streaming=mode == "service")
            print("RESULT " + json.dumps(rows[mode]), flush=True)
    if "teacher" in modes:
        teacher_rows = run_teacher(probs, args)
        tt = [r for r in teacher_rows if r["mode"] == "teacher-torch"]
        tv = [r for r in teacher_rows if r["mode"] == "teacher-vllm"]
        for name, rs in (("torch", tt), ("vllm", tv)):
            print(f"teacher {name}: " + ", ".join(f"{r['tokens'] / r['seconds']:.1f} tokens/s "
                                                 f"({r['tokens'] / r['cpu_s']:.1f} per CPU-s)" for r in rs))
        print("teacher vLLM / torch scored tokens/s: " + ", ".join(
            f"{(v['tokens'] / v['seconds']) / (t['tokens'] / t['seconds']):.2f}x wall, "
            f"{(v['tokens'] / v['cpu_s']) / (t['tokens'] / t['cpu_s']):.2f}x per CPU-s" for t, v in zip(tt, tv)))
    for mode in ("batch", "stream"):
        if mode in rows:
            print_lengths(mode, rows[mode]["lengths"], args.max_new_tokens)
    for r in rows.values():
        r.pop("lengths", None)
    slots = args.groups * args.samples
    if rows:
        print(f"\n| mode | tokens | wall s | tokens/s | CPU s | tokens / CPU-s | first group (s) | "
              f"live rows / step (of {slots}) | busy |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        occ = f"{r['tokens'] / r['steps']:.1f}" if "steps" in r else "—"
        busy = f"{r['busy_fraction']:.2f}" if "busy_fraction" in r else "1.00"
        print(f"| {mode} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['tokens'] / r['cpu_s']:.1f} | {r['first_group_s']:.1f} | {occ} | {busy} |")
    tps = {m: r["tokens"] / r["seconds"] for m, r in rows.items()}
    tpc = {m: r["tokens"] / r["cpu_s"] for m, r in rows.items()}
    if "stream" in rows and rows["stream"].get("merges"):
        r = rows["stream"]
        print(f"stream: mean KV-cache width {r['mean_cache_width']:.0f} columns per decode step; {r['merges']} "
              f"admissions (prefill + cache merge) took {r['merge_cpu_s']:.1f} CPU-s "
              f"({r['merge_cpu_s'] / r['cpu_s']:.1%} of the stream's)")
    if "batch" in tps and "stream" in tps:
        print(f"\nstream / batch tokens/s: {tps['stream'] / tps['batch']:.2f}x wall, "
              f"{tpc['stream'] / tpc['batch']:.2f}x per CPU-s (goal >= 1.3x); first group "
              f"{rows['batch']['first_group_s'] / rows['stream']['first_group_s']:.1f}x sooner")
    if args.repeats > 1 and "batch" in tps and "stream" in tps:
        pairs = [("batch", "stream")] + [(f"batch #{k}", f"stream #{k}") for k in range(2, args.repeats + 1)]
        ratios = sorted(tpc[s_] / tpc[b] for b, s_ in pairs)
        print(f"stream / batch per CPU-s, each interleaved pair: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {ratios[len(ratios) // 2]:.2f}x (goal >= 1.3x)")
    if "service" in tps and "stream" in tps:
        print(f"service / raw stream tokens/s: {tps['service'] / tps['stream']:.2f}x wall, "
              f"{tpc['service'] / tpc['stream']:.2f}x per CPU-s (goal >= 0.9x)")
    if "service-batch" in tps and "batch" in tps:
        print(f"service-batch / raw batch tokens/s: {tps['service-batch'] / tps['batch']:.2f}x wall, "
              f"{tpc['service-batch'] / tpc['batch']:.2f}x per CPU-s")
    if "service" in tps and "service-batch" in tps:
        print(f"service: stream / batch tokens/s: {tps['service'] / tps['service-batch']:.2f}x wall, "
              f"{tpc['service'] / tpc['service-batch']:.2f}x per CPU-s")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
