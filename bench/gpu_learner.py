"""The learner's step on a GPU: rlrt's `PolicyLearner.step` beside a plain training step.

    python bench/gpu_learner.py                       # Qwen3-0.6B shape, bf16, on cuda
    python bench/gpu_learner.py --seq-lens 1024,4096 --groups 4 --samples 8
    python bench/gpu_learner.py --tiny                # CPU smoke run, a tiny Qwen3 (seconds)

Model: a randomly initialised `Qwen3ForCausalLM` with Qwen3-0.6B's real shape (28 layers,
hidden 1024, 16 query / 8 KV heads of 128, MLP 3072, vocabulary 151936, tied embeddings);
no weights travel (none can reach the device). Random weights cost the same FLOPs as real
ones. Precision: `--precision bf16` (default) keeps weights, gradients and AdamW state in
bf16; `autocast` keeps fp32 weights and runs forward/backward under bf16 autocast.

Per sequence length L, the batch is `--groups` groups of `--samples` completions sharing a
prompt of `--prompt-len` tokens, responses of L - prompt_len tokens. Two steps on the same
model in the same process, each timed over `--steps` repetitions after one warm-up:

  rlrt   `PolicyLearner.step`: π_old pass (no grad), RLRT token advantages (teacher
         log-probs given for the correct rollouts of mixed groups), one PPO mini-batch:
         chunked-lm_head scoring with gradients, clip-higher surrogate, truncated IS,
         grad-clip, AdamW.
  plain  forward + cross-entropy over every position + backward + AdamW on the same
         sequences, the same micro-batches (what a plain SFT step costs).

It prints trained tokens/s (response tokens: what the RL loss is taken over) and total
tokens/s (prompt + response, the usual "tok/s" of trainers) for both, the ratio, and the
peak device memory of each. Anchors (prime-rl, Qwen3-0.6B, one H100): 11.9k tok/s for a full
RL step, 34.2k tok/s for a plain step; this project's goal is >= 20k tok/s on one H100/H200.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rlrt_core.config import AlgorithmConfig, LearnerConfig  # noqa: E402
from rlrt_core.learner import PolicyLearner, TrainGroup, TrainSample  # noqa: E402

# Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B).
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(QWEN3_06B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def build_model(shape: dict, precision: str, device: str, seed: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(**shape, attn_implementation="sdpa", use_cache=False)
    model = Qwen3ForCausalLM(cfg)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device)


def make_groups(n_groups: int, k: int, prompt_len: int, seq_len: int, vocab: int, seed: int) -> list[TrainGroup]:
    """Groups of k completions of length seq_len - prompt_len on one shared prompt; rewards
    mixed (a third correct), teacher scores on the correct ones (as the teacher sends them)."""
    rng = random.Random(seed)
    resp_len = seq_len - prompt_len
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        samples = []
        for i in range(k):
            resp = [rng.randrange(vocab) for _ in range(resp_len)]
            correct = i % 3 == 0
            behaviour = [-rng.uniform(0.5, 3.0) for _ in range(resp_len)]
            samples.append(TrainSample(prompt, resp, behaviour, 1.0 if correct else 0.0,
                                       student_logprobs=behaviour if correct else None,
                                       teacher_logprobs=[x + rng.uniform(-0.5, 0.5) for x in behaviour]
                                       if correct else None))
        groups.append(TrainGroup(f"g{g}", 0, samples))
    return groups


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, groups: list[TrainGroup], micro: int,
               device: str, precision: str) -> None:
    """Forward, next-token cross-entropy over every position, backward, AdamW: micro-batches of
    `micro` full sequences, gradients accumulated over the whole batch (one update)."""
    seqs = [s.prompt_ids + s.response_ids for g in groups for s in g.samples]
    opt.zero_grad(set_to_none=True)
    total = sum(len(s) - 1 for s in seqs)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "autocast" else torch.autocast("cpu", enabled=False)
    for i in range(0, len(seqs), micro):
        batch = seqs[i:i + micro]
        L = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, :len(s)] = torch.tensor(s)
            labels[r, :len(s)] = torch.tensor(s)
        ids, labels = ids.to(device), labels.to(device)
        with ctx:
            logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / total
        del logits
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(fn, steps: int, device: str) -> tuple[float, float]:
    """(median seconds per call after one warm-up call, peak device GiB)."""
    fn()
    _sync(device)
    _peak_reset(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], _peak_gib(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen3 shape on CPU (smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--precision", choices=["bf16", "autocast"], default="bf16")
    ap.add_argument("--seq-lens", default=None, help="comma-separated total lengths (default 1024,2048,4096)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (tiny: 16)")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8, help="completions per group (K)")
    ap.add_argument("--micro", type=int, default=None, help="sequences per forward/backward (default 8192 tokens' worth)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--method", default="rlrt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        shape, lens, prompt_len = TINY, args.seq_lens or "64,128", args.prompt_len or 16
    else:
        shape, lens, prompt_len = QWEN3_06B, args.seq_lens or "1024,2048,4096", args.prompt_len or 256
    if args.precision == "autocast" and not device.startswith("cuda"):
        ap.error("--precision autocast needs a CUDA device")
    try:
        seq_lens = [int(x) for x in lens.split(",")]
    except ValueError:
        ap.error(f"--seq-lens must be comma-separated integers, got {lens!r}")
    if any(L <= prompt_len for L in seq_lens):
        ap.error(f"every --seq-lens value must exceed --prompt-len ({prompt_len})")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    model = build_model(shape, args.precision, device, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {name}; torch {torch.__version__}; model Qwen3 {shape['num_hidden_layers']} layers x "
          f"{shape['hidden_size']}, vocab {shape['vocab_size']}, {n_params / 1e6:.1f}M params, {args.precision}; "
          f"{args.groups} groups x {args.samples} samples, prompt {prompt_len} tokens", flush=True)
    print("| seq len | step | s/step | trained tok/s | total tok/s | peak GiB | rlrt / plain |")
    print("|---|---|---|---|---|---|---|")
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for L in seq_lens:
        micro = args.micro or max(1, 8192 // L)
        groups = make_groups(args.groups, args.samples, prompt_len, L, shape["vocab_size"], args.seed)
        n_resp = sum(len(s.response_ids) for g in groups for s in g.samples)
        n_all = sum(len(s.prompt_ids) + len(s.response_ids) for g in groups for s in g.samples)
        lc = LearnerConfig(lr=1e-6, warmup_steps=0, groups_per_step=args.groups, mini_batch_groups=args.groups,
                           micro_batch_size=micro, ppo_epochs=1, device=device)
        ac = AlgorithmConfig(method=args.method, lam_init=0.5, eps_w=0.5)
        model.load_state_dict(init)
        learner = PolicyLearner(model, lc, ac, temperature=1.0, device=device)
        def rl() -> None:
            if args.precision == "bf16":
                learner.step(groups)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    learner.step(groups)

        rl_s, rl_mem = measure(rl, args.steps, device)
        del learner
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
        plain_s, plain_mem = measure(lambda: plain_step(model, opt, groups, micro, device, args.precision),
                                     args.steps, device)
        del opt
        for step, s, mem in (("rlrt", rl_s, rl_mem), ("plain", plain_s, plain_mem)):
            ratio = f"{plain_s / rl_s:.2f}x" if step == "rlrt" else "1.00x"
            print(f"| {L} | {step} | {s:.4g} | {n_resp / s:.0f} | {n_all / s:.0f} | {mem:.1f} | {ratio} |", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
