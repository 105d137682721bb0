"""`rlrt score`: verify a JSONL file of completions offline.

Each input line is a JSON object with `completion` and `answer`; the output repeats it with
`reward`, `extracted`, `outcome` and, when the completion could not be judged, `reason`.
Bad lines (not JSON, missing fields) are written with reward 0 and a reason; they never
stop the run. A summary table goes to stderr at the end.
"""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from rlrt_core.reward import OUTCOMES, Verifier, VerifyResult
from services.cli.app import app

console = Console(stderr=True)


class ModeChoice(str, Enum):
    boxed = "boxed"
    last_number = "last_number"


def _parse_line(raw: bytes, line_no: int, completion_key: str, answer_key: str) -> tuple[dict[str, Any], str | None]:
    """(row to write back, reason it is bad or None)."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return {"line": line_no}, f"line {line_no}: not UTF-8 ({err.reason})"
    except json.JSONDecodeError as err:
        return {"line": line_no}, f"line {line_no}: not valid JSON ({err.msg}, column {err.colno})"
    if not isinstance(row, dict):
        return {"line": line_no, "value": row}, f"line {line_no}: expected a JSON object, got {type(row).__name__}"
    for key in (completion_key, answer_key):
        if key not in row or row[key] is None:
            return row, f"line {line_no}: missing field {key!r}"
    if not isinstance(row[completion_key], str):
        return row, f"line {line_no}: field {completion_key!r} must be a string"
    ans = row[answer_key]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        return row, f"line {line_no}: field {answer_key!r} must be a string or number"
    return row, None


def _annotate(row: dict[str, Any], res: VerifyResult) -> dict[str, Any]:
    out = dict(row)
    out["reward"] = res.reward
    out["extracted"] = res.extracted
    out["outcome"] = res.outcome
    if res.reason is not None:
        out["reason"] = res.reason
    return out


@app.command("score")
def score_cmd(
    input: Path = typer.Option(..., "--input", "-i", help="JSONL with `completion` and `answer` per line"),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL written with reward/extracted/reason added"),
    mode: ModeChoice = typer.Option(ModeChoice.boxed, "--mode", help="answer extraction: boxed | last_number"),
    timeout: float = typer.Option(5.0, "--timeout", min=0.01, help="seconds per check before it counts as a timeout"),
    workers: int = typer.Option(2, "--workers", min=1, help="verifier worker processes"),
    completion_key: str = typer.Option("completion", "--completion-key", help="field holding the completion"),
    answer_key: str = typer.Option("answer", "--answer-key", help="field holding the reference answer"),
    chunk: int = typer.Option(512, "--chunk", min=1, help="lines verified per pool call"),
) -> None:
    """Score completions against reference answers (math verifier, hard time limit per check)."""
    if not input.is_file():
        console.print(f"[red]error:[/red] --input {input}: no such file")
        raise typer.Exit(2)
    with input.open("rb") as fh:
        total_lines = sum(1 for raw in fh if raw.strip())
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    counts = {o: 0 for o in OUTCOMES}
    bad = 0
    t0 = time.perf_counter()

    def flush(pending: list[tuple[dict[str, Any], str | None]], v: Verifier, out_fh: Any) -> None:
        nonlocal bad
        good = [row for row, reason in pending if reason is None]
        results = iter(v.verify([r[completion_key] for r in good], [str(r[answer_key]) for r in good]))
        for row, reason in pending:
            if reason is None:
                res = next(results)
                counts[res.outcome] += 1
                rec = _annotate(row, res)
            else:
                bad += 1
                rec = dict(row, reward=0.0, extracted=None, outcome="bad_line", reason=reason)
            out_fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    with Verifier(mode=mode.value, timeout_s=timeout, workers=workers) as v, progress, \
            input.open("rb") as in_fh, partial.open("w", encoding="utf-8") as out_fh:
        task = progress.add_task("score", total=total_lines)
        pending: list[tuple[dict[str, Any], str | None]] = []
        for line_no, raw in enumerate(in_fh, start=1):
            if not raw.strip():
                continue
            pending.append(_parse_line(raw, line_no, completion_key, answer_key))
            if len(pending) >= chunk:
                flush(pending, v, out_fh)
                progress.advance(task, len(pending))
                pending = []
        if pending:
            flush(pending, v, out_fh)
            progress.advance(task, len(pending))
    os.replace(partial, output)
    dt = time.perf_counter() - t0
    scored = sum(counts.values())
    table = Table(title=f"rlrt score ({mode.value}) -> {output}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = counts["correct"] / scored if scored else 0.0
    rows = [("lines", scored + bad), ("checked lines", scored), *((o, counts[o]) for o in OUTCOMES), ("bad lines", bad),
            ("accuracy (scored)", f"{acc:.4f}"), ("lines/s", f"{(scored + bad) / dt:.1f}" if dt > 0 else "-")]
    for name, val in rows:
        table.add_row(name, str(val))
    console.print(table)
