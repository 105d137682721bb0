"""Layering rules of the tree: services are thin adapters. No service module spells a method
name or a stream name (both come from the library: `rlrt_core.methods`, `rlrt_core.stages`),
and `rlrt_core` never imports from `services`."""

from __future__ import annotations

import ast
from pathlib import Path

from rlrt_core.methods import method_names
from rlrt_core.stages import STREAM_NAMES

ROOT = Path(__file__).resolve().parents[1]


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        # the project's own name is also a method's name: allowed as a logger or CLI app name
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("getLogger", "Typer"):
                skip.update(id(a) for a in [*node.args, *(k.value for k in node.keywords)])
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


# The pipeline's modules: the four services, the weight relay, their shared runtime and the launchers (the CLI's
# report words such as "rollouts" in `rlrt analyze` output are not stream names).
PIPELINE = [*(ROOT / "services" / d for d in ("rollout", "verifier", "teacher", "learner", "relay", "common")),
            ROOT / "services" / "launcher.py", ROOT / "services" / "ray_launcher.py", ROOT / "services" / "progress.py"]


def test_no_service_spells_a_method_or_stream_name():
    banned = set(method_names()) | set(STREAM_NAMES)
    files = sorted(f for p in PIPELINE for f in ([p] if p.is_file() else p.rglob("*.py")))
    assert len(files) >= 12
    found = [f"{p.relative_to(ROOT)}:{line}: {value!r}" for p in files
             for line, value in _literals(p) if value in banned]
    assert not found, "service modules must read methods and streams from the library:\n" + "\n".join(found)


def test_the_library_never_imports_services():
    bad = []
    for p in sorted((ROOT / "rlrt_core").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{p.relative_to(ROOT)}: {m}" for m in mods if m == "services" or m.startswith("services.")]
    assert not bad, bad
