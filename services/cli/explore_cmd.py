"""`rlrt explore RUN_DIR`: serve the run explorer page over a run's samples.

The learner writes `RUN_DIR/samples/step_NNNNNN.json` every `metrics.sample_every` steps
(`rlrt_core.samples`); this serves the same routes the learner's admin app mounts
(`services.common.explore`) on their own, on a port the kernel picks unless `--port` names
one, and prints the URL it listens on. Ctrl-C stops it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import typer
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from rich.console import Console

from services.cli.app import app
from services.common.explore import explore_router

console = Console(stderr=True)


def explore_app(run_dir: Path) -> FastAPI:
    """The explorer on its own: /explore and its API, / redirects to it."""
    web = FastAPI(title="rlrt explore", docs_url=None, redoc_url=None, openapi_url=None)
    web.include_router(explore_router(run_dir))

    @web.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/explore")

    return web


@app.command()
def explore(run_dir: Path = typer.Argument(..., help="a run directory (metrics.run_dir of a run)"),
            host: str = typer.Option("127.0.0.1", help="address to bind"),
            port: int = typer.Option(0, min=0, max=65535, help="port to bind (0: any free one)")) -> None:
    """Browse a run's samples: steps, rollouts, per-token D̂_t / D̄_t heat-maps and histograms."""
    import uvicorn

    if not run_dir.is_dir():
        console.print(f"[red]error:[/red] RUN_DIR {run_dir} is not a directory", soft_wrap=True)
        raise typer.Exit(2)
    if not (run_dir / "samples").is_dir():
        console.print(f"[yellow]{run_dir} has no samples yet[/yellow] (the learner writes them every "
                      f"metrics.sample_every steps); the page lists them as they appear", soft_wrap=True)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections made as soon as the URL is printed wait in the backlog
    except OSError as err:
        console.print(f"[red]error:[/red] cannot listen on {host}:{port} ({err}); pass --port 0 for any free port",
                      soft_wrap=True)
        raise typer.Exit(2)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"rlrt explore: http://{shown}:{bound}/explore  (run dir {run_dir}; Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(explore_app(run_dir), log_level="warning", access_log=False,
                                           lifespan="off"))
    server.run(sockets=[sock])
