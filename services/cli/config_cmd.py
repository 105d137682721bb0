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
