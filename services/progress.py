"""What a person sees of a run: the live view, `rlrt status`, the end summary and curves.png."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from services.launcher import read_metrics, service_endpoints


def _get_status(ep: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    url = f"http://{ep.get('host', '127.0.0.1')}:{ep['admin_port']}/status"
    try:
        r = httpx.get(url, timeout=timeout)
        return r.json() if r.status_code == 200 else {"error": f"HTTP {r.status_code}"}
    except (httpx.HTTPError, ValueError) as err:
        return {"error": type(err).__name__}


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _redis_services(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's service table in Redis (heartbeats of every service, dead ones included) and
    its live weight relays (the relay registry), read through the run's effective config;
    ([], []) when it cannot be reached."""
    try:
        from rlrt_core.config import load_config
        from rlrt_core.weights.records import live_relays
        from services.common.runtime import read_services

        cfg = load_config(run_dir / "config.yaml", use_env=False)
        if not cfg.transport.redis_url:
            return [], []
        import redis

        client = redis.Redis.from_url(cfg.transport.redis_url, socket_connect_timeout=1, socket_timeout=2)
        prefix = cfg.transport.stream_prefix
        try:
            services = read_services(client, prefix, cfg.run_name, heartbeat_s=cfg.metrics.heartbeat_s)
            relays = [{"relay_id": r.relay_id, "address": r.address, "node": r.node, "versions": list(r.versions),
                       "bytes_sent": r.bytes_sent, "pulled_bytes": r.pulled_bytes, "pulling": r.pulling,
                       "last_seen_s": round(time.time() - r.last_seen, 1)}
                      for r in live_relays(client, cfg.run_name, prefix=prefix)]
            return services, relays
        finally:
            client.close()
    except Exception:
        return [], []


def collect_status(run_dir: str | Path) -> dict[str, Any]:
    """Status of every expected service of the run, dead ones included: the launcher's plan,
    the services' registration files and their heartbeats in Redis; plus the learner's last
    metrics row. Each service has `alive` and, when alive, its /status."""
    from services.launcher import expected_workers

    run_dir = Path(run_dir)
    services: dict[str, dict[str, Any]] = {}
    import socket

    here = socket.gethostname()
    recs, relays = _redis_services(run_dir)
    for rec in recs:
        alive = rec.get("alive", False)
        if rec.get("host") == here and not _pid_alive(rec.get("pid")):
            alive = False  # on this machine the process table beats a heartbeat a few seconds old
        stopped = rec.get("state") == "stopped"
        services[rec["worker"]] = {"service": rec.get("service"), "worker": rec["worker"], "pid": rec.get("pid"),
                                   "alive": alive, "stopped": stopped,
                                   "status": {"error": ("stopped" if stopped else "down")
                                              + f" (last seen {rec.get('last_seen_s')}s ago)"}}
    for exp in expected_workers(run_dir):
        services.setdefault(exp["worker"], {**exp, "pid": None, "alive": False, "status": {"error": "down"}})
    for ep in service_endpoints(run_dir):
        if _pid_alive(ep.get("pid")):
            services[ep["worker"]] = {**ep, "alive": True, "status": _get_status(ep)}
        else:
            services[ep["worker"]] = {**ep, "alive": False, "status": {"error": "down (process gone)"}}
    rows = read_metrics(run_dir)
    return {"run_dir": str(run_dir), "services": sorted(services.values(), key=lambda s: str(s.get("worker"))),
            "relays": relays, "last_step": rows[-1] if rows else None, "steps": len(rows)}


def queue_rows(queues: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(stream, length, pending, lag) from `StreamBus.stats()` (pending/lag summed over groups)."""
    rows = []
    for name, info in sorted(queues.items()):
        if not isinstance(info, dict):
            continue
        groups = (info.get("groups") or {}).values()
        pending = sum(g.get("pending", 0) for g in groups) if groups else None
        lag = sum(g.get("lag", 0) for g in groups) if groups else None
        rows.append((name, info.get("length"), pending, lag))
    return rows


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_status(snap: dict[str, Any]) -> Group:
    t = Table(title=f"services of {snap['run_dir']}")
    for col in ("worker", "state", "pid", "ready", "version", "processed", "detail"):
        t.add_column(col)
    queues: dict[str, Any] = {}
    for s in snap["services"]:
        st = s.get("status", {})
        queues.update(st.get("queues", {}) or {})
        detail = st.get("error") or ", ".join(f"{k}={_fmt(v)}" for k, v in (st.get("counters") or {}).items())
        state = "[green]up[/green]" if s.get("alive", True) else \
            "stopped" if s.get("stopped") else "[red]DOWN[/red]"
        t.add_row(str(s.get("worker")), state, str(s.get("pid")), str(st.get("ready", "-")), _fmt(st.get("version")),
                  _fmt(st.get("processed")), detail[:80])
    parts: list[Any] = [t]
    if queues:
        q = Table(title="queues")
        for col in ("stream", "length", "pending", "lag"):
            q.add_column(col)
        for name, length, pending, lag in queue_rows(queues):
            q.add_row(name, _fmt(length), _fmt(pending), _fmt(lag))
        parts.append(q)
    if snap.get("relays"):
        r = Table(title="weight relays (live)")
        for col in ("relay", "address", "node", "versions", "sent", "pulled", "pulling"):
            r.add_column(col)
        for rec in snap["relays"]:
            r.add_row(rec["relay_id"], rec["address"], rec["node"], ",".join(map(str, rec["versions"])) or "-",
                      _bytes(rec["bytes_sent"]), _bytes(rec["pulled_bytes"]),
                      "-" if rec["pulling"] < 0 else str(rec["pulling"]))
        parts.append(r)
    last = snap.get("last_step")
    if last:
        m = Table(title=f"learner step {last.get('step')}")
        m.add_column("metric")
        m.add_column("value")
        for k in ("version", "reward/mean", "length/mean", "staleness/mean", "rlrt/upweighted_frac",
                  "tokens/per_s", "time/wait_data_s", "dropped_stale_total"):
            if k in last:
                m.add_row(k, _fmt(last[k]))
        parts.append(m)
    return Group(*parts)


class LiveView:
    """A one-line-per-step table refreshed while the run goes on."""

    def __init__(self, run: Any, console: Console) -> None:
        self.run = run
        self.console = console
        self._live: Live | None = None
        self._learner_status: dict[str, Any] = {}
        self._tick = 0

    def __enter__(self) -> "LiveView":
        self._live = Live(self._render(), console=self.console, refresh_per_second=2, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, _run: Any) -> None:
        self._tick += 1
        if self._tick % 2 == 0:
            for ep in service_endpoints(self.run.run_dir):
                if ep.get("service") == "learner" and _pid_alive(ep.get("pid")):
                    self._learner_status = _get_status(ep, timeout=0.5)
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        rows = read_metrics(self.run.run_dir)
        t = Table(title="training", expand=False)
        for col in ("step", "version", "reward", "length", "up-weighted", "staleness", "tokens/s", "wait s"):
            t.add_column(col, justify="right")
        for r in rows[-12:]:
            t.add_row(_fmt(r.get("step")), _fmt(r.get("version")), _fmt(r.get("reward/mean")),
                      _fmt(r.get("length/mean"), 1), _fmt(r.get("rlrt/upweighted_frac")),
                      _fmt(r.get("staleness/mean"), 2), _fmt(r.get("tokens/per_s"), 0), _fmt(r.get("time/wait_data_s"), 1))
        st = self._learner_status
        queues = st.get("queues") or {}
        qline = "  ".join(f"{name}: {_fmt(lag)}/{_fmt(pending)}" for name, _n, pending, lag in queue_rows(queues))
        alive = ", ".join(f"{c.worker}{'' if c.alive() else ' (down)'}" for c in self.run.children)
        target = self.run.cfg.learner.total_steps
        head = Table.grid()
        head.add_row(f"step {len(rows)}/{target}   version {st.get('version', '-')}   in flight "
                     f"{st.get('in_flight', '-')}   queues (waiting/in progress) {qline or '-'}")
        head.add_row(f"processes: {alive}")
        return Group(head, t)


def step_line(row: dict[str, Any], total_steps: int | None = None) -> str:
    """One plain line for one metrics.jsonl row: what the live view's table row shows, for logs."""
    step = _fmt(row.get("step")) + (f"/{total_steps}" if total_steps else "")
    wait = row.get("time/wait_data_s")
    return (f"step {step}  version {_fmt(row.get('version'))}  reward {_fmt(row.get('reward/mean'))}  "
            f"length {_fmt(row.get('length/mean'), 1)}  staleness {_fmt(row.get('staleness/mean'), 2)}  "
            f"tokens/s {_fmt(row.get('tokens/per_s'), 0)}  wait {'-' if wait is None else f'{wait:.1f}s'}")


class PlainProgress:
    """The live view's stand-in when stdout is not a terminal (CI logs, nohup, a pipe, a pod's
    log): one plain line per learner step, printed as its metrics.jsonl row appears.

    Rows already in metrics.jsonl when the view opens (a resumed run) are not repeated."""

    def __init__(self, run: Any, console: Console) -> None:
        self.run = run
        self.console = console
        self._printed = 0

    def __enter__(self) -> "PlainProgress":
        self._printed = len(read_metrics(self.run.run_dir))
        return self

    def __exit__(self, *exc: object) -> None:
        self.update(self.run)  # the learner's last row may land after the last tick

    def update(self, _run: Any) -> None:
        rows = read_metrics(self.run.run_dir)
        total = self.run.cfg.learner.total_steps
        for row in rows[self._printed:]:
            # print(), not console.print(): a non-terminal rich console wraps at 80 columns.
            print(step_line(row, total), file=self.console.file, flush=True)
        self._printed = max(self._printed, len(rows))


def progress_view(run: Any, console: Console) -> "LiveView | PlainProgress":
    """The live table on a terminal, one line per step otherwise."""
    return LiveView(run, console) if console.is_terminal else PlainProgress(run, console)


def write_summary(run_dir: str | Path, console: Console | None = None, *, wall_s: float | None = None) -> Path | None:
    """Print a summary table of the run and write `curves.png` (reward, length, up-weighted
    fraction per step). Returns the PNG path, or None when there is nothing to plot."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    console = console or Console()
    if not rows:
        console.print(f"[yellow]no learner steps recorded in {run_dir}[/yellow]")
        return None
    first, last = rows[0], rows[-1]
    k = max(1, min(5, len(rows) // 3))
    head = sum(r.get("reward/mean", 0.0) for r in rows[:k]) / k
    tail = sum(r.get("reward/mean", 0.0) for r in rows[-k:]) / k
    t = Table(title=f"summary of {run_dir}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("steps", str(len(rows)))
    t.add_row("final version", _fmt(last.get("version")))
    t.add_row(f"reward, first {k} steps", _fmt(head))
    t.add_row(f"reward, last {k} steps", _fmt(tail))
    t.add_row("response length first → last", f"{_fmt(first.get('length/mean'), 1)} → {_fmt(last.get('length/mean'), 1)}")
    t.add_row("dropped stale groups", _fmt(last.get("dropped_stale_total")))
    t.add_row("skipped non-finite updates", _fmt(last.get("skipped_updates_total")))
    if wall_s is not None:
        t.add_row("wall time", f"{wall_s:.0f} s")
    console.print(t)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.get("step") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [("reward/mean", "training reward"), ("length/mean", "response length (tokens)"),
              ("rlrt/upweighted_frac", "up-weighted fraction (correct rollouts)")]
    for ax, (key, title) in zip(axes, series):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    method = last.get("method", "")
    fig.suptitle(f"{method.upper()} on {run_dir.name} (rlrt)")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    console.print(f"curves: {out}")
    return out
