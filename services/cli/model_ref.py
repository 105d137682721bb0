"""What `--model` names on the CLI: a Hugging Face directory, a built-in name, a run's checkpoint
(`runs/x/checkpoints/step_000010`: the run's config.yaml names the base model, the checkpoint's
model.safetensors replaces its weights) or a run directory (its latest checkpoint).
Shared by `rlrt eval` and `rlrt analyze`."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

CHECKPOINT_WEIGHTS = "model.safetensors"


def run_base_model(run_dir: Path) -> tuple[str, str]:
    """(model.path, model.dtype) recorded in a run directory's config.yaml."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} has no config.yaml; not a run directory")
    try:
        doc = yaml.safe_load(cfg_path.read_text()) or {}
        model = doc["model"]
        return str(model["path"]), str(model.get("dtype", "float32"))
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path}: cannot read model.path ({err})") from None


def run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of a run, oldest first."""
    root = run_dir / "checkpoints"
    out = []
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / CHECKPOINT_WEIGHTS).is_file():
            out.append((int(m.group(1)), p))
    return out


def resolve_model_spec(spec: str) -> tuple[str, Path | None, int]:
    """--model -> (base model path or name, checkpoint dir or None, step; -1 when not a checkpoint)."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / CHECKPOINT_WEIGHTS).is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        base, _ = run_base_model(run_dir)
        m = re.fullmatch(r"step_(\d+)", p.name)
        return base, p, int(m.group(1)) if m else -1
    if p.is_dir() and (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        ckpts = run_checkpoints(p)
        if not ckpts:
            raise ValueError(f"run directory {p} has no checkpoints under {p / 'checkpoints'}")
        base, _ = run_base_model(p)
        step, path = ckpts[-1]
        return base, path, step
    return spec, None, -1
