#!/usr/bin/env python3
"""Weight versions over the WeightService: full fp32, full bf16 and delta bf16, side by side.

    python bench/weights.py [--steps 3] [--seq 32] [--lr 2e-5]

SmolLM2-135M-Instruct (fp32 master weights) takes `--steps` real optimizer steps: plain
AdamW (rlrt's `make_optimizer`: lr 2e-5 as configs/demo.yaml, weight decay 0.01, betas
0.9/0.999) on a language-model loss over two short arithmetic texts -- not PolicyLearner
steps on RL groups; the size of a step's change is set by Adam's normalised update
(~lr per element), which is the same for either loss. After every step the learner
publishes the new version to a gRPC server on loopback in fp32 and in bf16, and clients pull:

  full fp32      the whole version (what every worker pulled before transport.weights_dtype)
  full bf16      the whole version in the engines' dtype
  delta bf16     rebuilt from the previous version, xor-zstd and sparse encodings, each
                 verified by sha256 of the whole rebuilt version (first pull of a pair
                 includes the server's encoding; a second client gets the cached delta)
  collective     the bf16 version broadcast by a CollectiveSender (transport.weights_backend:
                 collective) over gloo to a member (rlrt_core.weights.collective), from the
                 offer to the version staged and sha256-verified at the member; after the
                 last step also to 4 members at once. The members are receiver threads of
                 this process (gloo and hashlib release the GIL): on a GPU cluster the same
                 code runs over NCCL, one member per vLLM worker.

and, after the last step, learner egress (bytes the server sends) for one version with 1 and
4 clients pulling at once, without and with a weight relay (rlrt_core.weights.relay: a relay
pulls the version once from the learner, a delta from the version it holds, and the clients
pull from the relay; announcements on an embedded Redis, all servers real gRPC on loopback). Per-version bytes are then scaled by parameter count to Qwen3
0.6B / 4B / 8B (same fraction of changed values, i.e. the same learning rate: the paper's
1e-6 for 4B/8B changes fewer bf16 values than 2e-5, so those are upper bounds).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import tempfile
import threading
import time
import uuid

import numpy as np
import torch

from rlrt_core.config import LearnerConfig
from rlrt_core.learner import make_optimizer
from rlrt_core.models import load_model, load_tokenizer
from rlrt_core.transport.embedded import EmbeddedRedis
from rlrt_core.weights import HeldVersion, WeightClient, WeightServer, announce_version
from rlrt_core.weights.collective import CollectiveReceiver, CollectiveSender
from rlrt_core.weights.relay import WeightRelay

TOKEN = "bench"
# Elements a published version holds: parameters, plus the tied lm_head that state_dict()
# lists again (Qwen3-0.6B and -4B tie embeddings: 151936 x 1024 / x 2560; 8B does not).
SCALES = {"Qwen3-0.6B": 0.60e9 + 151936 * 1024, "Qwen3-4B": 4.02e9 + 151936 * 2560, "Qwen3-8B": 8.19e9}


def changed_fraction(a: HeldVersion, b: HeldVersion) -> float:
    """Fraction of floating-point elements whose bytes differ between two held versions."""
    changed = total = 0
    for x, y in zip(a.tensors, b.tensors):
        width = {"F32": 4, "BF16": 2, "F16": 2}.get(x.dtype)
        if width is None:
            continue
        u = {4: np.uint32, 2: np.uint16}[width]
        xa, ya = np.frombuffer(x.raw, u), np.frombuffer(y.raw, u)
        changed += int(np.count_nonzero(xa != ya))
        total += xa.size
    return changed / total


def timed_pull(client: WeightClient, version: int, held: HeldVersion | None = None, **kw):
    t0 = time.perf_counter()
    pulled = client.pull(version, held=held, **kw)
    return pulled, time.perf_counter() - t0


def egress(server: WeightServer, clients: list[WeightClient], version: int, helds: list[HeldVersion | None],
           **kw) -> tuple[int, float, list[str]]:
    """Bytes the server sent while every client pulled `version` at once, the wall time, kinds."""
    before = server.bytes_sent
    kinds: list[str] = [""] * len(clients)

    def run(i: int) -> None:
        if helds[i] is None:  # a full pull, not kept (N full copies would not fit this box)
            stream = clients[i].stream(version)
            for _ in stream:
                pass
            kinds[i] = "full"
        else:
            kinds[i] = clients[i].pull(version, held=helds[i], **kw).kind
            helds[i] = None

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return server.bytes_sent - before, time.perf_counter() - t0, kinds


def relay_egress(learner: WeightServer, redis_client, n: int, version: int, base: HeldVersion | None):
    """One relay between the learner and `n` clients pulling `version` at once: a delta from
    `base` (held by the relay and by every client, as after the previous version) when given,
    else full. Returns (learner bytes sent, relay bytes sent, seconds from the announcement
    to the last client done, kinds of the client pulls)."""
    run = f"bench-{uuid.uuid4().hex[:8]}"
    with WeightServer(token=TOKEN, keep_versions=2) as relay_server:
        relay = WeightRelay(relay_server, redis_client, run, relay_id="bench-relay", advertise=relay_server.address,
                            node="bench", make_client=lambda target: WeightClient(target, token=TOKEN))
        clients = [WeightClient(relay_server.address, token=TOKEN) for _ in range(n)]
        try:
            if base is not None:  # the relay already serves the base version
                announce_version(redis_client, run, base.version, address=learner.address)
                assert relay.sync_once() == base.version
            announce_version(redis_client, run, version, address=learner.address)
            before = learner.bytes_sent
            t0 = time.perf_counter()
            assert relay.sync_once() == version
            pulled = time.perf_counter() - t0
            learner_sent = learner.bytes_sent - before
            helds = [None if base is None else copy.deepcopy(base) for _ in range(n)]
            relay_sent, sec, kinds = egress(relay_server, clients, version, helds)
            kind = relay.pulls
            assert kind["delta" if base is not None else "full"] == 1, kind
            return learner_sent, relay_sent, pulled + sec, kinds
        finally:
            for c in clients:
                c.close()
            relay.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32, help="tokens per training text")
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model).train()
    tok = load_tokenizer(args.model)
    n_params = sum(t.numel() for t in model.state_dict().values())  # published elements
    opt = make_optimizer(model, LearnerConfig(lr=args.lr, weight_decay=0.01))
    texts = ["What is 12 + 35? 12 + 35 = 47. " * 8, "What is 7 * 8? 7 * 8 = 56. " * 8]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.seq)
    load = os.getloadavg()
    print(f"model {args.model}: {n_params / 1e6:.1f}M elements in {len(model.state_dict())} published tensors "
          f"(the tied lm_head counted again, as state_dict() lists it); {args.steps} AdamW steps at lr {args.lr:g}; load average {load[0]:.1f} "
          f"on {os.cpu_count()} CPUs")

    rows: dict[str, list[tuple[int, float]]] = {k: [] for k in (
        "full fp32", "full bf16", "delta bf16 xor-zstd", "delta bf16 xor-zstd (cached)", "delta bf16 sparse",
        "delta bf16 sparse (cached)", "collective bf16 (gloo, 1 member)")}
    publish_s: dict[str, list[float]] = {"fp32": [], "bf16": []}
    fractions: list[float] = []
    with WeightServer(token=TOKEN, keep_versions=1) as s32, WeightServer(token=TOKEN, keep_versions=2) as s16, \
            WeightClient(s32.address, token=TOKEN) as c32, WeightClient(s16.address, token=TOKEN) as c16:
        def publish(v: int) -> None:
            sd = model.state_dict()
            for name, server, dtype in (("fp32", s32, None), ("bf16", s16, "bfloat16")):
                t0 = time.perf_counter()
                server.publish(v, sd, dtype=dtype)
                publish_s[name].append(time.perf_counter() - t0)
                server.checksum(v)

        sender = CollectiveSender(timeout_s=120.0)
        bcast_s: list[float] = []
        members = [CollectiveReceiver(sender.address(), timeout_s=120.0)]

        def broadcast(v: int, rxs: list[CollectiveReceiver]) -> tuple[int, float]:
            """Offer version v of the bf16 server; (bytes, seconds until every member staged
            and verified it)."""
            t0 = time.perf_counter()
            sender.offer_from_server(s16, v)
            for rx in rxs:
                got, why = rx.wait(v, 300.0)
                assert got is not None and got.checksum == s16.checksum(v), why
            return got.nbytes, time.perf_counter() - t0

        publish(0)
        while not members[0].status().member_id:  # registered before the first offer
            time.sleep(0.05)
        broadcast(0, members)  # forms the group
        held_x = c16.pull(0).held
        held_s = copy.deepcopy(held_x)
        for v in range(1, args.steps + 1):
            t0 = time.perf_counter()
            out = model(**batch, labels=batch["input_ids"])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            step_s = time.perf_counter() - t0
            publish(v)
            prev = copy.deepcopy(held_x)  # version v-1
            p, sec = timed_pull(c32, v)
            rows["full fp32"].append((p.bytes_received, sec))
            p, sec = timed_pull(c16, v)
            rows["full bf16"].append((p.bytes_received, sec))
            full16 = p.held
            for enc, held in (("xor-zstd", held_x), ("sparse", held_s)):
                spare = copy.deepcopy(held)
                p, sec = timed_pull(c16, v, held, encodings=(enc,))
                assert p.kind == "delta" and p.held.checksum == full16.checksum, p.reason
                rows[f"delta bf16 {enc}"].append((p.bytes_received, sec))
                p, sec = timed_pull(c16, v, spare, encodings=(enc,))
                rows[f"delta bf16 {enc} (cached)"].append((p.bytes_received, sec))
            rows["collective bf16 (gloo, 1 member)"].append(broadcast(v, members))
            bcast_s.append(sender.last_seconds)
            fractions.append(changed_fraction(prev, held_x))
            base = prev  # version v-1: the base N workers would hold, for the egress run below
            del full16
            print(f"step {v}: loss {out.loss.item():.3f} ({step_s:.1f}s); bf16 values changed "
                  f"{fractions[-1]:.2%}; delta xor-zstd {rows['delta bf16 xor-zstd'][-1][0] / 1e6:.1f} MB, "
                  f"sparse {rows['delta bf16 sparse'][-1][0] / 1e6:.1f} MB, full bf16 "
                  f"{rows['full bf16'][-1][0] / 1e6:.1f} MB", flush=True)

        print()
        print_versions(rows, publish_s, fractions)
        print(flush=True)
        # Learner egress for the last version: N clients pull it at once, as N workers would
        # (no relay: every worker pulls from the learner). Free what the steps needed first:
        # N held copies of the base come on top (the shared box has little memory to spare).
        del model, opt, held_x, held_s, p, spare
        s32.stop()
        s32._versions.clear()
        s32._latest = s32._spare = None
        gc.collect()
        last = args.steps
        # The collective to 4 members at once (a new group of 4; the first broadcast forms it).
        members += [CollectiveReceiver(sender.address(), timeout_s=120.0) for _ in range(3)]
        while not all(rx.status().member_id for rx in members):
            time.sleep(0.05)
        coll_rows = [("collective bf16 (gloo)", 1, *rows["collective bf16 (gloo, 1 member)"][-1], bcast_s[-1])]
        for _ in range(2):  # the first forms the group of 4, the second is timed alone
            nbytes, sec = broadcast(last, members)
        coll_rows.append(("collective bf16 (gloo)", 4, nbytes, sec, sender.last_seconds))
        for rx in members:
            rx.close()
        sender.close()
        egress_rows = []
        clients = [WeightClient(s16.address, token=TOKEN) for _ in range(4)]
        try:
            for n in (1, 4):
                sent, sec, kinds = egress(s16, clients[:n], last, [None] * n)
                egress_rows.append(("full bf16", n, sent, sec, kinds))
                sent, sec, kinds = egress(s16, clients[:n], last, [copy.deepcopy(base) for _ in range(n)],
                                          encodings=("xor-zstd",))
                egress_rows.append(("delta bf16 xor-zstd", n, sent, sec, kinds))
            # Without and with a relay, in the default delta encoding (sparse) on every hop.
            relay_rows = []
            with tempfile.TemporaryDirectory(prefix="rlrt-bench-") as tmp, \
                    EmbeddedRedis(tmp, appendonly=False) as url:
                import redis

                r = redis.Redis.from_url(url)
                for kind, held in (("full bf16", None), ("delta bf16 sparse", base)):
                    for n in (1, 4):
                        sent, sec, kinds = egress(s16, clients[:n], last,
                                                  [None if held is None else copy.deepcopy(held) for _ in range(n)])
                        relay_rows.append((kind, n, sent, 0, sec, kinds))
                    for n in (1, 4):
                        relay_rows.append((f"{kind} via 1 relay", n, *relay_egress(s16, r, n, last, held)))
                r.close()
        finally:
            for c in clients:
                c.close()
    print_egress(egress_rows)
    print()
    print_relay_egress(relay_rows)
    print()
    print_collective(coll_rows)
    print()
    print_scaled(rows, n_params)


def print_versions(rows, publish_s, fractions) -> None:
    full16 = np.mean([b for b, _ in rows["full bf16"]])
    print(f"per version, mean of {len(fractions)} steps (bf16 values changed per step: "
          f"{', '.join(f'{f:.2%}' for f in fractions)})")
    print(f"{'transfer':34s} {'MB/version':>11s} {'x fewer than full bf16':>23s} {'s/version':>10s} {'MB/s':>8s}")
    for name, vals in rows.items():
        b = float(np.mean([x for x, _ in vals]))
        sec = float(np.mean([t for _, t in vals]))
        print(f"{name:34s} {b / 1e6:11.2f} {full16 / b:23.1f} {sec:10.2f} {b / 1e6 / sec:8.1f}")
    print(f"learner publish (copy + cast): fp32 {np.mean(publish_s['fp32']):.2f} s, "
          f"bf16 {np.mean(publish_s['bf16']):.2f} s per version")


def print_egress(egress_rows) -> None:
    print(f"{'learner egress, last version':34s} {'clients':>7s} {'MB sent':>9s} {'x one copy':>10s} {'s':>7s}")
    one = {}
    for name, n, sent, sec, kinds in egress_rows:
        one.setdefault(name, sent)
        assert len(set(kinds)) == 1, kinds
        print(f"{name:34s} {n:7d} {sent / 1e6:9.2f} {sent / one[name]:10.2f} {sec:7.2f}", flush=True)


def print_relay_egress(relay_rows) -> None:
    """Learner egress per version without and with a relay; `x one copy` is the learner's
    bytes over one worker's pull of the same kind without a relay."""
    print(f"{'learner egress per version':34s} {'workers':>7s} {'learner MB':>10s} {'x one copy':>10s} "
          f"{'relay MB':>9s} {'s':>7s}")
    one = {}
    for name, n, sent, relay_sent, sec, kinds in relay_rows:
        one.setdefault(name.removesuffix(" via 1 relay"), sent)
        assert len(set(kinds)) == 1, kinds
        print(f"{name:34s} {n:7d} {sent / 1e6:10.2f} {sent / one[name.removesuffix(' via 1 relay')]:10.2f} "
              f"{relay_sent / 1e6:9.2f} {sec:7.2f}", flush=True)


def print_collective(coll_rows) -> None:
    print(f"{'collective broadcast, last version':34s} {'members':>7s} {'MB/version':>10s} {'s to verified':>13s} "
          f"{'s broadcast':>11s}")
    for name, n, nbytes, sec, bsec in coll_rows:
        shown = f"{bsec:11.2f}" if bsec else f"{'-':>11s}"
        print(f"{name:34s} {n:7d} {nbytes / 1e6:10.2f} {sec:13.2f} {shown}", flush=True)


def print_scaled(rows, n_params) -> None:
    full16 = float(np.mean([b for b, _ in rows["full bf16"]]))
    delta = float(np.mean([x for x, _ in rows["delta bf16 xor-zstd"]]))
    print(f"scaled by published elements (bytes per element here: full bf16 {full16 / n_params:.2f}, "
          f"delta bf16 {delta / n_params:.3f})")
    sparse = float(np.mean([x for x, _ in rows["delta bf16 sparse"]]))
    print(f"{'model':12s} {'full fp32 GB':>12s} {'full bf16 GB':>12s} {'delta xor-zstd GB':>17s} {'delta sparse GB':>15s}")
    full32 = float(np.mean([x for x, _ in rows["full fp32"]]))
    for name, n in SCALES.items():
        print(f"{name:12s} {full32 / n_params * n / 1e9:12.2f} {full16 / n_params * n / 1e9:12.2f} "
              f"{delta / n_params * n / 1e9:17.3f} {sparse / n_params * n / 1e9:15.3f}")


if __name__ == "__main__":
    main()
