"""`rlrt` entry point: imports every sub-command module (each registers on `app`)."""

from __future__ import annotations

from services.cli import config_cmd  # noqa: F401
from services.cli import run_cmds  # noqa: F401
from services.cli import eval_cmd  # noqa: F401
from services.cli import score_cmd  # noqa: F401
from services.cli import launch_cmd  # noqa: F401
from services.cli import analyze_cmd  # noqa: F401
from services.cli import explore_cmd  # noqa: F401
from services.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
