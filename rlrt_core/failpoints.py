"""Named fault-injection points for the chaos tests (in the spirit of FreeBSD/TiKV failpoints).

Code marks a point with `failpoint("learner.before_announce", step=n)`. It does nothing unless
the environment arms it:

    RLRT_FAILPOINTS=learner.before_announce@3,learner.checkpoint_write@2
    RLRT_FAILPOINT_DIR=/tmp/fp

An armed point, when reached (at that step, or at any step when `@N` is omitted), creates
`{dir}/{name}@{step}.hit` and blocks until `{dir}/{name}@{step}.release` exists (or
`RLRT_FAILPOINT_TIMEOUT_S`, default 300 s, passes), so a test can inject a fault at exactly
that moment (kill Redis, SIGKILL the process) and then let it go on. Each point fires once
per process.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
_fired: set[str] = set()


def _armed() -> dict[str, int | None]:
    spec = os.environ.get("RLRT_FAILPOINTS", "").strip()
    out: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, at = part.partition("@")
        out[name] = int(at) if at else None
    return out


def failpoint(name: str, *, step: int | None = None) -> None:
    """Block here if the tests armed `name` (see module docstring); a no-op otherwise."""
    armed = _armed()
    if name not in armed or (armed[name] is not None and armed[name] != step):
        return
    tag = f"{name}@{step if step is not None else 'any'}"
    if tag in _fired:
        return
    _fired.add(tag)
    d = Path(os.environ.get("RLRT_FAILPOINT_DIR", "."))
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{tag}.hit").write_text(str(os.getpid()))
    log.warning("failpoint %s reached: waiting for %s", tag, d / f"{tag}.release")
    deadline = time.monotonic() + float(os.environ.get("RLRT_FAILPOINT_TIMEOUT_S", "300"))
    while not (d / f"{tag}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
