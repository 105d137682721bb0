"""`rlrt config`: validate a recipe and print the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlrt_core.config import ConfigError, dump_config, load_config
from services.cli.app import app


@app.command("config")
def config_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="recipe YAML (defaults when omitted)"),
) -> None:
    """Validate a recipe (plus RLRT__* env overrides) and print the effective config."""
    try:
        cfg = load_config(config)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(dump_config(cfg), nl=False)
