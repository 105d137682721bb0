"""The typer application every `rlrt` sub-command registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rlrt",
    help="rlrt: asynchronous RLVR trainer with RLRT (RLVR with Reversed Teacher).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """rlrt: asynchronous RLVR trainer with RLRT (RLVR with Reversed Teacher)."""
