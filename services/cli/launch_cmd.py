"""`rlrt launch --ray`: the services as Ray actors on a cluster (services/ray_launcher.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from services.cli.app import app
from services.cli.run_cmds import _load, console


@app.command("launch")
def launch(
    config: Path = typer.Option(..., "--config", "-c", help="recipe YAML (its `ray` section sizes the actors)"),
    use_ray: bool = typer.Option(False, "--ray", help="place the services on a Ray cluster"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address ('auto', 'ray://head:10001'); "
                                          "default ray.address, else a local cluster"),
    rollout_workers: Optional[int] = typer.Option(None, "--rollout-workers", min=1,
                                                  help="rollout actors (default ray.rollout_workers)"),
    timeout_s: Optional[float] = typer.Option(None, "--timeout", help="give up after this many seconds"),
) -> None:
    """Run a recipe on Ray: every service a Ray actor with the resources of the config's `ray`
    section, crashed actors restarted, the same Redis + gRPC data path; returns when the learner ends."""
    if not use_ray:
        console.print("[red]error:[/red] `rlrt launch` needs --ray (use `rlrt train` for local processes)")
        raise typer.Exit(2)
    try:
        import ray  # noqa: F401
    except ImportError:
        console.print("[red]error:[/red] Ray is not installed: pip install 'rlrt[ray]'")
        raise typer.Exit(2)
    from services.ray_launcher import RayRun

    cfg = _load(config)
    run = RayRun(cfg, address=address, rollout_workers=rollout_workers)
    t0 = time.time()
    try:
        run.start()
        console.print(f"[bold]rlrt launch --ray[/bold] {config.name}: {len(run.actors)} actors, run dir {run.run_dir}")
        rc = run.wait(timeout_s=timeout_s)
    except (ValueError, TimeoutError) as err:
        console.print(f"[red]error:[/red] {err}")
        rc = 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping actors[/yellow]")
        rc = 130
    finally:
        run.stop()
    console.print(f"learner exited with {rc} after {time.time() - t0:.0f}s; logs in {run.run_dir / 'logs'}")
    raise typer.Exit(rc)
