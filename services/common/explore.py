"""The run explorer's HTTP routes: one self-contained page (inline CSS/JS/SVG, nothing fetched
from elsewhere) and its JSON, over the samples a learner writes (`rlrt_core.samples`).

    GET /explore                     the page (steps -> rollouts -> token heat-map, histogram)
    GET /explore/api/steps           {"run_dir", "steps": [summary...], "skipped": [{"file", "reason"}]}
    GET /explore/api/steps/{step}    the step's sample; 404 (no such step) / 422 (unusable file)

`rlrt explore RUN_DIR` serves them alone; the learner's admin app mounts them for its run dir.
Read-only, like /status: no token.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

from rlrt_core.samples import SampleError, SampleNotFound, StepReader

PAGE = Path(__file__).with_name("explore.html")


@lru_cache(maxsize=1)
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


def explore_router(run_dir: str | os.PathLike[str], prefix: str = "/explore") -> APIRouter:
    """The explorer's routes for `run_dir`, under `prefix`."""
    reader = StepReader(run_dir)
    shown = str(run_dir)
    router = APIRouter(prefix=prefix)

    @router.get("", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"cache-control": "no-store"})

    @router.get("/api/steps")
    def steps() -> JSONResponse:
        good, bad = reader.list()
        return JSONResponse({"run_dir": shown, "steps": good, "skipped": bad})

    @router.get("/api/steps/{step}")
    def one(step: int) -> JSONResponse:
        try:
            return JSONResponse(reader.read(step))
        except SampleNotFound as err:
            return JSONResponse(status_code=404, content={"detail": str(err)})
        except SampleError as err:
            return JSONResponse(status_code=422, content={"detail": f"sample of step {step} is unusable: {err}"})

    return router
