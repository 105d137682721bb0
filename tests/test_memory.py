"""Memory of the services: the processes that need no torch do not load it, and
`rlrt_core.heap` gives freed heap memory back to the OS (docs/BENCHMARKS.md, demo memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_launcher_verifier_and_config_validation_do_not_import_torch() -> None:
    # The launcher (`rlrt demo`), `rlrt serve verifier` and the verifier's checker pool (which
    # re-imports the CLI as __mp_main__) import and call these; torch would cost each ~250 MB,
    # matplotlib (the analyze report, the launcher's final curves) ~45 MB.
    got = json.loads(_run(
        "import json, sys\n"
        "import services.cli.main, services.launcher, services.verifier.main, services.progress\n"
        "import rlrt_core.transport\n"
        "from rlrt_core.config import check_paths, load_config\n"
        "from rlrt_core.checkpoint import latest_checkpoint\n"
        "from rlrt_core.weights import ensure_token_file, live_relays\n"
        "from services.common.runtime import error_kind, is_transient\n"
        "cfg = load_config('configs/demo.yaml', overrides={'algorithm': {'method': 'sdpo'}}, use_env=False)\n"
        "check_paths(cfg)\n"
        "assert latest_checkpoint('/nonexistent') is None\n"
        "from services.launcher import read_metrics\n"
        "assert read_metrics('/nonexistent') == []  # the progress view reads it every tick\n"
        "assert error_kind(ValueError()) == 'internal' and not is_transient(ValueError())\n"
        "try:\n"
        "    load_config('configs/demo.yaml', overrides={'algorithm': {'method': 'nope'}}, use_env=False)\n"
        "    refused = ''\n"
        "except Exception as err:\n"
        "    refused = str(err)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'matplotlib': 'matplotlib' in sys.modules,\n"
        "                  'method': cfg.algorithm.method, 'refused': refused}))\n"))
    assert got["method"] == "sdpo"
    assert "unknown method 'nope'" in got["refused"] and "rlrt" in got["refused"]  # the registry still validates
    assert got["torch"] is False and got["matplotlib"] is False


def test_codec_dtype_tables_are_built_on_first_use() -> None:
    from rlrt_core.transport import codec

    import torch

    assert codec.DTYPE_TO_TORCH["BF16"] is torch.bfloat16
    assert codec.TORCH_TO_DTYPE[torch.float32] == "F32"
    with pytest.raises(AttributeError):
        codec.NOT_A_NAME  # noqa: B018


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc")
def test_trim_returns_freed_heap_memory_to_the_os() -> None:
    # 100 KB blocks come from the heap (below glibc's mmap threshold); the last one stays
    # allocated, so the freed ones sit below the top of the heap, which glibc does not give
    # back by itself: the learner's freed activations and gradients look like this.
    got = json.loads(_run(
        "import json\n"
        "from rlrt_core import heap\n"
        "assert heap.limit_arenas(2)\n"
        "blocks = [bytearray(100_000) for _ in range(3000)]\n"
        "for b in blocks: b[::4096] = b'x' * len(b[::4096])\n"
        "keep = blocks[-1]\n"
        "del blocks\n"
        "before = heap.rss_mib()[0]\n"
        "released = heap.trim()\n"
        "after, peak = heap.rss_mib()\n"
        "print(json.dumps({'before': before, 'after': after, 'peak': peak, 'released': released}))\n"))
    assert got["released"] is True
    assert got["before"] > got["after"] + 200, got  # ~290 MiB freed, most of it returned
    assert got["peak"] > 250, got  # VmHWM keeps the mark
