"""Peak RSS of every process of a command, e.g. the whole `rlrt demo`:

    python bench/peak_rss.py -- python -m services.cli.main demo --steps 3 --run-dir /tmp/mem-demo

Runs the command, reads VmHWM (the kernel's own peak-RSS mark, so no peak between samples is
missed) from /proc/<pid>/status of it and every descendant every `--every` seconds with
`bench/pipeline.py`'s /proc helpers, and prints one Markdown row per process when it ends:
the service (`serve <service> --worker <name>`), a helper of a service (e.g. the verifier's
checker pool), the launcher itself, or the command line. The sum of per-process peaks is
what the demo's memory figure in README / configs/demo.yaml states.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import _descendants, _proc_table, _service_of, _vm_hwm_kib  # noqa: E402


def label(pid: int, root: int, table: dict[int, tuple[int, int, str]], labels: dict[int, str]) -> str:
    """A readable name for one process: its service, a helper of its parent's, or the launcher."""
    cmd = table[pid][2]
    if pid == root:
        return "launcher (the command itself)"
    name = _service_of(cmd)
    if name is not None:
        return name
    parent = labels.get(table[pid][0])
    if parent is not None and parent != "launcher (the command itself)":
        return f"{parent.split(' ')[0]} helper"
    return " ".join(cmd.split()[:4])[:60] or f"pid {pid}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=0.5, help="seconds between /proc samples")
    ap.add_argument("--json", type=Path, default=None, help="also write {label: MiB} here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    proc = subprocess.Popen(cmd)
    peak: dict[int, int] = {}        # pid -> highest VmHWM seen (KiB)
    labels: dict[int, str] = {}
    while True:
        table = _proc_table()
        for pid in sorted(_descendants(table, proc.pid)):
            if pid not in table:
                continue
            labels.setdefault(pid, label(pid, proc.pid, table, labels))
            hwm = _vm_hwm_kib(pid)
            if hwm is not None:
                peak[pid] = max(peak.get(pid, 0), hwm)
        if proc.poll() is not None:
            break
        time.sleep(args.every)
    per_label: dict[str, float] = {}
    for pid, kib in peak.items():
        name = labels[pid]
        # One row per process; a restarted or second process of the same name gets its own.
        key, n = name, 1
        while key in per_label:
            n += 1
            key = f"{name} #{n}"
        per_label[key] = kib / 1024
    print(f"\nexit {proc.returncode}; peak RSS (VmHWM) per process:\n\n| process | peak RSS |\n|---|---:|")
    for name, mib in sorted(per_label.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {mib:.0f} MiB |")
    print(f"| sum of per-process peaks | {sum(per_label.values()) / 1024:.2f} GiB |")
    if args.json:
        args.json.write_text(json.dumps(per_label, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
