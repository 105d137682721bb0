"""Atomic checkpoints that never unpickle: safetensors for tensors, JSON for everything else.

Layout of one checkpoint (a directory, renamed into place only once complete):

    <root>/step_000010/
        model.safetensors       policy weights
        optimizer.safetensors   optimizer per-parameter tensors, keys "<param_index>.<name>"
        rng.safetensors         torch CPU RNG state (and CUDA when present)
        zero_rank<r>_of_<W>.safetensors   ZeRO-1/2/3: each rank's optimizer partition
                                (`rlrt_core.distributed`, written through `write_files`)
        state.json              step, version, optimizer scalars/param_groups, scheduler,
                                python RNG, admission accounting, data cursor, extra
    <root>/latest               the name of the newest complete checkpoint

Nothing is ever unpickled: a checkpoint is as safe to load as the weights it holds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported by the functions that read or write tensors: the launcher
    import torch  # only looks for the latest checkpoint and must not load it (~250 MB)

LATEST = "latest"


@dataclass
class Checkpoint:
    path: Path
    step: int
    version: int
    state: dict[str, Any]


def _optimizer_to_flat(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    # JSON turns tuples into lists; optimizers keep e.g. `betas` as tuples.
    groups = [{k: tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import torch
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    py = meta.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(root: str | os.PathLike[str], *, step: int, version: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    extra: dict[str, Any] | None = None, keep: int = 2,
                    before_commit: Callable[[], None] | None = None,
                    write_files: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically (temp dir + rename + `latest` pointer); prune to `keep`.
    `write_files(tmp_dir)` adds files of its own first (every rank's optimizer shard; the
    directory must be on storage all ranks see). `before_commit()` runs after every file is on
    disk and before the rename (a test hook)."""
    from safetensors.torch import save_file
    import torch
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    for stale in root.glob(".step_*.tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    if write_files is not None:  # first: ranks wait in it, so nothing of ours may fail before
        write_files(tmp)
    # Tied weights (embed/lm_head) share storage and safetensors refuses shared tensors: clone
    # the second name of a shared storage only (a full clone cost the learner one more model
    # copy at every checkpoint). safetensors writes each tensor straight from its memory.
    sd: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (str(v.device), v.untyped_storage().data_ptr())
        sd[k] = v.clone() if key in seen else v
        seen.add(key)
    save_file(sd, str(tmp / "model.safetensors"))
    state: dict[str, Any] = {"step": step, "version": version, "extra": extra or {}}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state["optimizer"] = opt_meta
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state["rng"] = rng_meta
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if before_commit is not None:
        before_commit()
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, root / LATEST)
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").is_file():
            return cand
    ckpts = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | os.PathLike[str], *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = True) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint` into the given objects (in place)."""
    from safetensors.torch import load_file
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Tied lm_head may be absent from the state dict; anything else missing is an error.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing={missing} unexpected={unexpected}")
    if optimizer is not None and (path / "optimizer.safetensors").is_file():
        optimizer.load_state_dict(_optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and (path / "rng.safetensors").is_file():
        _restore_rng(load_file(str(path / "rng.safetensors")), state.get("rng", {}))
    return Checkpoint(path=path, step=int(state["step"]), version=int(state["version"]), state=state)
