"""`rlrt eval`: sample k completions per problem, verify them, report avg@k and pass@k.

pass@k uses the unbiased estimator of Chen et al. (2021) on the same n = k samples, for
every k of `--pass-at` (default 1, 2, 4, ..., k). One table row per data set; `--json`
writes the full report (per-problem counts included).
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rlrt_core.config import ConfigError, DataConfig, load_config
from rlrt_core.data import BUILTIN_DATASETS, DataError, Problem, arithmetic_problems, load_jsonl, resolve_data_path
from rlrt_core.evaluation import EvalReport, default_pass_ks, evaluate, parse_ks
from rlrt_core.reward import Verifier
from services.cli.app import app
from services.cli.score_cmd import ModeChoice

console = Console(stderr=True)


class EngineChoice(str, Enum):
    torch = "torch"
    vllm = "vllm"


def _fail(msg: str) -> NoReturn:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


def _load_dataset(spec: str, *, data_cfg: DataConfig, instruction: str | None, from_recipe: bool,
                  limit: int | None) -> tuple[str, list[Problem]]:
    """`arithmetic[:digits[:ops]]`, a built-in name (gsm8k-test) or a JSONL path -> (name, problems).

    Default instruction (`instruction` None): the recipe's data.instruction when a recipe was
    given; otherwise the built-in one for arithmetic and none for files (complete prompts)."""
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        a = data_cfg.arithmetic
        parts = spec.split(":")
        try:
            digits = int(parts[1]) if len(parts) > 1 and parts[1] else a.digits
        except ValueError:
            raise ValueError("digits must be an integer (arithmetic:DIGITS:OPS)") from None
        ops = list(parts[2]) if len(parts) > 2 and parts[2] else list(a.ops)
        probs = arithmetic_problems(digits=digits, ops=ops, num_problems=limit or a.num_problems, seed=a.seed,
                                    instruction=data_cfg.instruction if instruction is None else instruction)
        return f"arithmetic-{digits}d-{''.join(ops)}", probs
    path = resolve_data_path(spec)
    if instruction is None:
        instruction = data_cfg.instruction if from_recipe else None
    probs = load_jsonl(path, instruction=instruction or None, max_problems=limit)
    return (spec if spec in BUILTIN_DATASETS else path.stem), probs


def _table(reports: list[EvalReport], ks: list[int], title: str) -> Table:
    """One column per data set, one row per metric (stays readable with many pass@k values)."""
    table = Table(title=title)
    table.add_column("metric")
    for r in reports:
        table.add_column(r.dataset, justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("problems", [str(r.num_problems) for r in reports]),
        (f"avg@{reports[0].k}", [f"{r.avg_at_k:.4f}" for r in reports]),
        *((f"pass@{k}", [f"{r.pass_at_k[k]:.4f}" for r in reports]) for k in ks),
        ("unparseable", [f"{r.outcomes['unparseable'] / (r.num_problems * r.k):.1%}" for r in reports]),
        ("timeouts", [str(r.outcomes["timeout"]) for r in reports]),
        ("truncated", [f"{r.truncated_frac:.1%}" for r in reports]),
        ("completions/s", [f"{r.completions_per_s:.1f}" for r in reports]),
    ]
    for name, vals in rows:
        table.add_row(name, *vals)
    return table


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="HF model directory, a built-in name (smollm2-135m-instruct, tiny), a run's "
                                            "checkpoint (runs/x/checkpoints/step_N) or a run directory (its latest checkpoint)"),
    data: list[str] = typer.Option(..., "--data", "-d",
                                   help="JSONL file, built-in name (gsm8k-test, gsm8k-train) or arithmetic[:DIGITS[:OPS]]; repeatable"),
    k: int = typer.Option(16, "-k", "--samples", min=1, help="samples per problem (n of pass@k)"),
    engine: EngineChoice = typer.Option(EngineChoice.torch, "--engine", help="generation engine: torch | vllm"),
    pass_at: Optional[str] = typer.Option(None, "--pass-at", help="comma-separated k values, each <= -k (default 1,2,4,...,k)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    mode: ModeChoice = typer.Option(ModeChoice.boxed, "--mode", help="answer extraction: boxed | last_number"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N problems of each data set"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report as JSON here"),
    instruction: Optional[str] = typer.Option(None, "--instruction",
                                              help="appended to every prompt (default: the recipe's data.instruction; without --config the built-in one for arithmetic, none for files)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="problems per engine call"),
    timeout: float = typer.Option(5.0, "--timeout", min=0.01, help="verifier seconds per check"),
    workers: int = typer.Option(2, "--workers", min=1, help="verifier worker processes"),
    device: Optional[str] = typer.Option(None, "--device", help="engine device (default: the recipe's rollout.device)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="recipe YAML for engine settings"),
    save_completions: bool = typer.Option(False, "--save-completions", help="include every completion's text in --json"),
) -> None:
    """Evaluate a model: avg@k and unbiased pass@k per data set."""
    try:
        ks = parse_ks(pass_at, k) if pass_at else default_pass_ks(k)
    except ValueError as err:
        _fail(f"--pass-at: {err}")
    from services.cli.model_ref import CHECKPOINT_WEIGHTS, resolve_model_spec

    try:  # a run's checkpoint (or run dir): its base model, then the checkpoint's weights in place
        base_model, ckpt, ckpt_step = resolve_model_spec(model)
    except ValueError as err:
        _fail(f"--model {model}: {err}")
    overrides: dict[str, Any] = {"model": {"path": base_model}, "rollout": {"engine": engine.value, "n_samples": k}}
    if dtype:
        overrides["model"]["dtype"] = dtype
    if device:
        overrides["rollout"]["device"] = device
    try:
        cfg = load_config(config, overrides=overrides)
    except ConfigError as err:
        _fail(str(err))
    datasets: list[tuple[str, list[Problem]]] = []
    for spec in data:
        try:
            datasets.append(_load_dataset(spec, data_cfg=cfg.data, instruction=instruction,
                                          from_recipe=config is not None, limit=limit))
        except (DataError, ValueError) as err:
            _fail(f"--data {spec}: {err}")

    from rlrt_core.engines import make_engine

    t0 = time.perf_counter()
    try:
        eng = make_engine(cfg)
        if ckpt is not None:
            from safetensors.torch import load_file

            eng.load_weights(load_file(str(ckpt / CHECKPOINT_WEIGHTS)), version=max(ckpt_step, 0))
    except (ValueError, ImportError, OSError, RuntimeError) as err:
        _fail(f"cannot start the {engine.value} engine for --model {model}: {err}")
    console.print(f"[bold]rlrt eval[/bold] model={model} engine={engine.value} k={k} mode={mode.value} "
                  f"(engine ready in {time.perf_counter() - t0:.1f} s)")
    reports: list[EvalReport] = []
    total = sum(len(p) for _, p in datasets)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=True)
    with Verifier(mode=mode.value, timeout_s=timeout, workers=workers) as verifier, progress:
        overall = progress.add_task("problems", total=total)
        for name, problems in datasets:
            task = progress.add_task(name, total=len(problems))

            def advance(m: int, task: Any = task) -> None:
                progress.advance(task, m)
                progress.advance(overall, m)

            reports.append(evaluate(eng, problems, verifier, k=k, pass_ks=ks, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                    dataset=name, keep_texts=save_completions, on_progress=advance))
    close = getattr(eng, "close", None)
    if callable(close):
        close()
    Console().print(_table(reports, ks, f"{model} ({engine.value}, {mode.value}, n={k}, T={temperature})"))
    if json_out is not None:
        doc = {"model": model, "engine": engine.value, "k": k, "pass_at": ks, "mode": mode.value,
               "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
               "datasets": [r.to_dict() for r in reports]}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=1))
        console.print(f"report written to {json_out}")
