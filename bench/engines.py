"""Rollout throughput of each available engine on SmolLM2-135M-Instruct, side by side.

Shape: P prompts x K samples x up to N new tokens (default 8 x 8 x 256), temperature 1, fp32.
Prompts ask for step-by-step explanations so completions run long; throughput counts the tokens
actually generated (EOS included), so both engines are measured on the same work definition.
Each engine runs in its own subprocess: the torch engine with this interpreter, vLLM with the
one of .venv-vllm (or this one if it imports vllm). A warm-up call precedes the timed call.

    .venv/bin/python bench/engines.py [--prompts 8 --samples 8 --max-new-tokens 256 --engines torch,vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["37 * 24", "the area of a circle of radius 3", "15% of 240", "the sum 1 + 2 + ... + 20",
          "143 / 11", "2 to the power 10", "the average of 4, 9 and 17", "a 20% discount on 85 dollars"]


def _worker(args: argparse.Namespace) -> None:
    from rlrt_core.engines import SamplingParams, TorchEngine
    from rlrt_core.prompts import student_prompt_ids

    if args.engine == "torch":
        engine = TorchEngine(args.model)
    else:
        from rlrt_core.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(args.model, max_model_len=1024, kv_cache_gib=2.0)
    try:
        prompts = [student_prompt_ids(engine.tokenizer, f"Explain step by step how to compute {TOPICS[i % len(TOPICS)]}.")
                   for i in range(args.prompts)]
        engine.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=8, seed=0))  # warm-up
        sp = SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1)
        t0 = time.perf_counter()
        res = engine.generate(prompts, sp)
        seconds = time.perf_counter() - t0
        lens = [len(c.token_ids) for r in res for c in r.completions]
        stops = sum(c.finish_reason == "stop" for r in res for c in r.completions)
        print("RESULT " + json.dumps({"engine": args.engine, "seconds": seconds, "tokens": sum(lens),
                          "mean_len": sum(lens) / len(lens), "stopped": stops, "completions": len(lens)}), flush=True)
    finally:
        engine.close()


def _python_for(engine: str) -> str | None:
    if engine == "torch":
        return sys.executable
    venv = REPO / ".venv-vllm" / "bin" / "python"
    for py in (sys.executable, str(venv)):
        if Path(py).exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0:
            return py
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--engines", default="torch,vllm")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        _worker(args)
        return

    rows = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        py = _python_for(engine)
        if py is None:
            print(f"{engine}: not available (no interpreter imports vllm; run `make vllm-env`)")
            continue
        cmd = [py, __file__, "--engine", engine, "--model", args.model, "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            print(f"{engine}: failed\n{proc.stderr[-3000:]}")
            continue
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not found:
            print(f"{engine}: printed no result\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(found[-1][len("RESULT "):]))
    print(f"{args.model}: {args.prompts} prompts x {args.samples} samples x <= {args.max_new_tokens} new tokens, "
          f"temperature 1.0, fp32, {os.cpu_count()} CPUs")
    print(f"{'engine':<8}{'tokens':>8}{'mean len':>10}{'stopped':>9}{'seconds':>10}{'tokens/s':>10}")
    for r in rows:
        print(f"{r['engine']:<8}{r['tokens']:>8}{r['mean_len']:>10.1f}{r['stopped']:>6}/{r['completions']:<3}"
              f"{r['seconds']:>9.1f}{r['tokens'] / r['seconds']:>10.1f}")
    if len(rows) == 2:
        a, b = rows
        print(f"throughput ratio {b['engine']}/{a['engine']}: "
              f"{(b['tokens'] / b['seconds']) / (a['tokens'] / a['seconds']):.2f}x")


if __name__ == "__main__":
    main()
