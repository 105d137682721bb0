"""`rlrt demo`, `rlrt train`, `rlrt serve`, `rlrt status`: running the trainer."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from rlrt_core.config import ConfigError, RunConfig, check_paths, load_config
from rlrt_core.stages import SERVICES
from services.cli.app import app

console = Console()
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _load(path: Path | None, overrides: dict | None = None) -> RunConfig:
    """Load and validate a recipe, including the files it names (at start-up, not 30 s later)."""
    try:
        cfg = load_config(path, overrides=overrides)
        check_paths(cfg)
        return cfg
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2)


def _run_local(cfg: RunConfig, *, rollout_workers: int, title: str, timeout_s: float | None = None) -> None:
    from services.launcher import LocalRun
    from services.progress import progress_view, write_summary

    run = LocalRun(cfg, n_rollout=rollout_workers, on_event=lambda msg: console.print(f"[red]launcher:[/red] {msg}"))
    from rlrt_core.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run.run_dir / "checkpoints")
    if ck is not None:
        done = int(ck.name.split("_")[-1])
        if done >= cfg.learner.total_steps:
            console.print(f"[yellow]{run.run_dir} already holds a finished run ({done} steps); delete it or pass "
                          f"--run-dir to start a new one, or --steps N to train further[/yellow]")
            write_summary(run.run_dir, console)
            return
        console.print(f"resuming from {ck} (step {done} of {cfg.learner.total_steps})")
    interrupted = False

    def _sigterm(_sig: int, _frm: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.time()
    rc = 1
    try:
        run.prepare()
        console.print(f"[bold]{title}[/bold]  run dir: {run.run_dir}  redis: {_redact(run.cfg.transport.redis_url)}",
                      soft_wrap=True)
        run.start()
        with progress_view(run, console) as view:
            rc = run.wait(on_tick=view.update, timeout_s=timeout_s)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping services (a second run resumes from the last checkpoint)[/yellow]")
    finally:
        run.stop()
        signal.signal(signal.SIGTERM, old)
    write_summary(run.run_dir, console, wall_s=time.time() - t0)
    if interrupted:
        raise typer.Exit(130)
    if run.failure is not None:
        console.print(f"[red]run stopped: {run.failure}[/red]")
        raise typer.Exit(rc)
    if rc != 0:
        console.print(f"[red]learner exited with code {rc}; see {run.run_dir / 'logs'}[/red]")
        raise typer.Exit(rc)


def _redact(url: str | None) -> str:
    if not url or "@" not in url:
        return str(url)
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


@app.command("demo")
def demo(
    tiny: bool = typer.Option(False, "--tiny", help="tiny random model: the whole pipeline in about a minute"),
    rollout_workers: int = typer.Option(1, "--rollout-workers", min=1, help="rollout worker processes"),
    method: Optional[str] = typer.Option(None, "--method", help="a registered method (see `rlrt methods`); "
                                         "default: the recipe's"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="learner steps (default from the recipe)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="where logs, metrics, checkpoints go"),
    plugin: list[str] = typer.Option([], "--plugin", help="module registering methods (algorithm.plugins; "
                                     "must be importable, e.g. on PYTHONPATH)"),
) -> None:
    """The main job: a short RLRT run on the embedded defaults (SmolLM2-135M-Instruct,
    single-digit arithmetic, embedded Redis unless REDIS_URL is set), all four services as
    local processes, with a live view (one plain line per step when stdout is not a terminal);
    writes a summary and curves.png to the run dir."""
    overrides: dict = {}
    if plugin:
        overrides.setdefault("algorithm", {})["plugins"] = list(plugin)
    if method:
        overrides.setdefault("algorithm", {})["method"] = method
    if steps:
        overrides.setdefault("learner", {})["total_steps"] = steps
    if run_dir:
        overrides.setdefault("metrics", {})["run_dir"] = str(run_dir)
    cfg = _load(CONFIG_DIR / ("tiny.yaml" if tiny else "demo.yaml"), overrides)
    title = f"rlrt demo{' --tiny' if tiny else ''}: {cfg.algorithm.method} on {cfg.model.path}"
    _run_local(cfg, rollout_workers=rollout_workers, title=title)


@app.command("train")
def train(
    config: Path = typer.Option(..., "--config", "-c", help="recipe YAML under configs/ or your own"),
    rollout_workers: int = typer.Option(1, "--rollout-workers", min=1),
) -> None:
    """Run any recipe with every service as a local process (same data path as a cluster)."""
    cfg = _load(config)
    _run_local(cfg, rollout_workers=rollout_workers, title=f"rlrt train {config.name}: {cfg.algorithm.method}")


@app.command("serve")
def serve(
    service: str = typer.Argument(..., help="rollout | verifier | teacher | learner | relay"),
    config: Path = typer.Option(..., "--config", "-c", help="recipe YAML (env RLRT__* overrides apply)"),
    worker: Optional[str] = typer.Option(None, "--worker", help="worker id (default: <service>-<hostname>)"),
) -> None:
    """Run one service alone (what docker-compose and Kubernetes run)."""
    if service not in (*SERVICES, "relay"):
        console.print(f"[red]error:[/red] unknown service {service!r}; choose one of {', '.join(SERVICES)}, relay")
        raise typer.Exit(2)
    from rlrt_core.heap import limit_arenas

    # Before any service thread exists: every thread that allocates would get its own glibc
    # heap (gRPC, torch, uvicorn threads), each keeping what it freed (rlrt_core.heap).
    limit_arenas(2)
    cfg = _load(config)
    from services.common.runtime import default_worker_id

    worker_id = worker or default_worker_id(service)
    if service == "rollout":
        from services.rollout.main import run
    elif service == "verifier":
        from services.verifier.main import run
    elif service == "teacher":
        from services.teacher.main import run
    elif service == "relay":
        from services.relay.main import run
    else:
        from services.learner.main import run
    raise typer.Exit(run(cfg, worker_id))


@app.command("status")
def status(
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="run directory of a running run"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """A table of a running run: every service's status, queue depths, learner progress."""
    from services.progress import collect_status, render_status

    snap = collect_status(run_dir)
    if as_json:
        typer.echo(json.dumps(snap, indent=1, default=str))
        return
    if not snap["services"]:
        console.print(f"[yellow]no services registered under {run_dir}[/yellow]")
        raise typer.Exit(1)
    console.print(render_status(snap))
    if any(not s.get("alive", True) and not s.get("stopped") for s in snap["services"]):
        raise typer.Exit(3)  # some expected service is down (not cleanly stopped): scripts can tell
