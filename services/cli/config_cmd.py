"""`rlrt config`: validate a recipe and print the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlrt_core.config import ConfigError, check_paths, dump_config, load_config
from services.cli.app import app


@app.command("config")
def config_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="recipe YAML (defaults when omitted)"),
    check_files: bool = typer.Option(True, "--check-paths/--no-check-paths",
                                     help="also check that model.path / data.path exist on this machine"),
) -> None:
    """Validate a recipe (plus RLRT__* env overrides) and print the effective config."""
    try:
        cfg = load_config(config)
        if check_files:
            check_paths(cfg)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(dump_config(cfg), nl=False)


@app.command("methods")
def methods_cmd(
    plugin: list[str] = typer.Option([], "--plugin", help="module that registers methods (repeatable)"),
) -> None:
    """List the registered training methods (built-ins and plugins) and what each needs."""
    from rich.console import Console
    from rich.table import Table

    from rlrt_core.config import import_plugins
    from rlrt_core.methods import get_method, method_names

    try:
        import_plugins(plugin)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    t = Table(title="registered methods")
    for col in ("method", "loss", "teacher scores", "groups", "context", "top-k rows", "std norm", "entropy"):
        t.add_column(col)
    for name in method_names():
        s = get_method(name)
        t.add_row(name, s.loss, s.teacher_scores, s.score_groups if s.needs_teacher else "-",
                  s.context if s.needs_teacher else "-", "yes" if s.needs_topk else "no",
                  "on" if s.norm_by_std else "off", f"{s.entropy_coef:g}")
    Console().print(t)
