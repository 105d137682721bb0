"""Peak memory and time of chunked scoring vs the naive full log-softmax.

Model: SmolLM2's vocabulary (49152) and width (576) with 2 layers, random weights (memory and
time depend on shapes, not values). Shape: B x T = 16 x 1024 scored response tokens after a
32-token prompt. Each variant runs in its own subprocess; peak = VmHWM growth over the RSS just
before the call (VmHWM reset through /proc/self/clear_refs), so model weights and inputs are not
counted. The parent compares the log-probs of both variants and prints the ratios.

    .venv/bin/python bench/scoring_memory.py [--batch 16 --resp-len 1024 --chunk-size 256]
    .venv/bin/python bench/scoring_memory.py --grad --batch 4 --resp-len 512   # learner path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(vocab: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _run_variant(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from rlrt_core.scoring import score_tokens

    model = _model(args.vocab, args.layers)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g).tolist()
    resps = torch.randint(0, args.vocab, (args.batch, args.resp_len), generator=g).tolist()
    P = args.prompt_len

    def naive():
        ids = torch.tensor([p + r for p, r in zip(prompts, resps)])
        with torch.set_grad_enabled(args.grad):
            logits = model(ids).logits.float()  # [B, L, V]
            logp = torch.log_softmax(logits, dim=-1)  # [B, L, V] float32: the tensor chunking avoids
            out = logp[:, P - 1 : -1].gather(-1, ids[:, P:, None]).squeeze(-1)
            if args.grad:
                out.sum().backward()
        return out

    def chunked():
        res = score_tokens(model, prompts, resps, chunk_size=args.chunk_size, grad=args.grad)
        if args.grad:
            res.logprobs.sum().backward()
        return res.logprobs

    fn = naive if args.variant == "naive" else chunked
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    save_file({"logprobs": out.detach().contiguous()}, args.out)
    print(json.dumps({"variant": args.variant, "peak_bytes": peak, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resp-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--grad", action="store_true", help="forward + backward (the learner's path)")
    ap.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        _run_variant(args)
        return

    import torch
    from safetensors.torch import load_file

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "chunked"):
            out = os.path.join(tmp, f"{variant}.safetensors")
            cmd = [sys.executable, __file__, "--variant", variant, "--out", out] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant]["logprobs"] = load_file(out)["logprobs"]
    n, c = results["naive"], results["chunked"]
    diff = float((n["logprobs"] - c["logprobs"]).abs().max())
    gib = 1 << 30
    mode = "forward+backward" if args.grad else "forward (no grad)"
    print(f"scoring {args.batch} x {args.resp_len} tokens, vocab {args.vocab}, {args.layers} layers of width 576, "
          f"{mode}, chunk_size {args.chunk_size}, torch threads {torch.get_num_threads()}")
    print(f"{'variant':<10}{'peak RSS growth':>18}{'time':>10}")
    for name, r in (("naive", n), ("chunked", c)):
        print(f"{name:<10}{r['peak_bytes'] / gib:>14.3f} GiB{r['seconds']:>9.2f}s")
    print(f"peak memory ratio naive/chunked: {n['peak_bytes'] / max(c['peak_bytes'], 1):.1f}x   "
          f"time ratio naive/chunked: {n['seconds'] / c['seconds']:.2f}x   max |logprob diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
