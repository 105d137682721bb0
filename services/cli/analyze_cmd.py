"""`rlrt analyze heatmap|markers|reflection|shift`: the paper's diagnostics on a model or checkpoint.

Each sub-command samples rollouts with the torch engine, verifies them, scores them under the
views it needs and writes `<out>/report.json` (every number), PNG figures and a self-contained
`<out>/report.html`. The maths is in `rlrt_core.analysis`; this module runs models and plots.
Procedures (docs/analysis.md has the full text):

- heatmap   (sec. 4.1, Fig. 2; App. E, H): D̄_t = KL(P_S || P_T) per token, explore/exploit candidates.
- markers   (sec. 4.3, Fig. 3; App. D): arg-max / arg-min of D̂_t(v), smoothed log-odds z-scores.
- reflection (sec. 6.2, Fig. 6): "Wait, let me reconsider." at argmax / random / argmin D̄_t.
- shift     (sec. 6.3, Fig. 7): JS(π_ft || π_base), top-k overlap, tail promotion.

`--model` takes a Hugging Face directory, a built-in name (`smollm2-135m-instruct`, `tiny`),
a checkpoint directory of a run (`runs/x/checkpoints/step_000010`: the run's config.yaml names
the base model, the checkpoint's model.safetensors replaces its weights) or a run directory
(its latest checkpoint).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rlrt_core import analysis as an
from rlrt_core.config import DataConfig
from rlrt_core.data import DataError, Problem
from rlrt_core.prompts import student_prompt_ids, teacher_prompt_ids
from rlrt_core.reward import Verifier
from services.cli.analyze_report import GREEN, GREY, PINK, Report, pyplot, token_heat_html
from services.cli.app import app
from services.cli.eval_cmd import _load_dataset
from services.cli.model_ref import CHECKPOINT_WEIGHTS, resolve_model_spec, run_base_model, run_checkpoints
from services.cli.score_cmd import ModeChoice

if TYPE_CHECKING:  # torch and the scoring code are imported by the commands that run them:
    import torch  # every `rlrt` process (the launcher, `serve verifier`) imports this module

console = Console(stderr=True)
analyze_app = typer.Typer(help="The paper's diagnostics (D̄_t heat-maps, markers, reflection injection, "
                               "distribution shift) on a model or a run's checkpoints; see docs/analysis.md.",
                          no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")



def _fail(msg: str) -> NoReturn:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


# --------------------------------------------------------------------------------------
# models, data, sampling
# --------------------------------------------------------------------------------------


def load_engine(spec: str, *, dtype: str, device: str):
    """A TorchEngine for --model (see the module docstring); checkpoint weights loaded in place."""
    from safetensors.torch import load_file

    from rlrt_core.engines import TorchEngine

    base, ckpt, step = resolve_model_spec(spec)
    engine = TorchEngine(base, dtype=dtype, device=device)
    if ckpt is not None:
        engine.load_weights(load_file(str(ckpt / CHECKPOINT_WEIGHTS)), version=max(step, 0))
    return engine


def load_problems_arg(data: str, limit: int) -> tuple[str, list[Problem]]:
    """--data: `builtin` / `arithmetic[:DIGITS[:OPS]]` (instruction "Reply with only the number."),
    `gsm8k-test` / `gsm8k-train`, or a JSONL file."""
    spec = "arithmetic" if data == "builtin" else data
    try:
        return _load_dataset(spec, data_cfg=DataConfig(), instruction=None, from_recipe=False, limit=limit)
    except (DataError, ValueError) as err:
        _fail(f"--data {data}: {err}")


def default_mode(data: str, mode: Optional[ModeChoice]) -> str:
    if mode is not None:
        return mode.value
    return "last_number" if data == "builtin" or data.startswith("arithmetic") else "boxed"


@dataclass
class Rollout:
    """One sampled completion of a problem and its verdict."""

    problem: Problem
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    reward: float
    finish_reason: str

    @property
    def body_len(self) -> int:
        """Response positions excluding a final EOS (those where text can be injected/inspected)."""
        return len(self.token_ids) - (1 if self.finish_reason == "stop" else 0)


def sample_rollouts(engine, verifier: Verifier, problems: list[Problem], *, n: int, max_new_tokens: int,
                    temperature: float, seed: int, batch: int, progress: Progress, label: str) -> list[list[Rollout]]:
    """n verified rollouts per problem: out[i][j] is sample j of problems[i]."""
    from rlrt_core.engines.base import SamplingParams
    tok = engine.tokenizer
    task = progress.add_task(f"{label}: sampling", total=len(problems))
    out: list[list[Rollout]] = []
    for s in range(0, len(problems), batch):
        chunk = problems[s:s + batch]
        prompts = [student_prompt_ids(tok, p.prompt) for p in chunk]
        res = engine.generate(prompts, SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                                      seed=seed + s))
        texts = [c.text for r in res for c in r.completions]
        answers = [p.answer for p in chunk for _ in range(n)]
        try:
            verdicts = verifier.verify(texts, answers)
        except RuntimeError as err:  # a pool that cannot start (e.g. an overloaded machine)
            _fail(f"verifier: {err}")
        k = 0
        for p, pr, r in zip(chunk, prompts, res):
            group = []
            for c in r.completions:
                group.append(Rollout(p, pr, list(c.token_ids), c.text, verdicts[k].reward, c.finish_reason))
                k += 1
            out.append(group)
        progress.advance(task, len(chunk))
    return out


def teacher_context(ro: Rollout, group: list[Rollout]) -> str | None:
    """Privileged context c as the teacher service chooses it: the reference solution, else the
    first successful peer rollout of the same group (never the rollout itself), else None."""
    if ro.problem.solution:
        return ro.problem.solution
    for other in group:
        if other is not ro and other.reward >= 0.5 and other.text.strip():
            return other.text
    return None


def view_rows(model, tok, ro: Rollout, context: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-prob rows [T, V] of the rollout under the student and teacher views (eq. 1)."""
    from rlrt_core.scoring import logprob_rows
    t_prompt = teacher_prompt_ids(tok, ro.problem.prompt, context)
    s_rows, t_rows = logprob_rows(model, [ro.prompt_ids, t_prompt], [ro.token_ids, ro.token_ids])
    return s_rows, t_rows


def token_texts(tok, ids: list[int]) -> list[str]:
    """Each id decoded alone (what a heat-map shows per token)."""
    return [tok.decode([i], skip_special_tokens=False) for i in ids]


# --------------------------------------------------------------------------------------
# shared options
# --------------------------------------------------------------------------------------

MODEL_HELP = ("HF model directory, built-in name (smollm2-135m-instruct, tiny), a run's checkpoint directory "
              "(runs/x/checkpoints/step_N) or a run directory (its latest checkpoint)")
DATA_HELP = "builtin (= arithmetic: 1-digit sums), arithmetic[:DIGITS[:OPS]], gsm8k-test, gsm8k-train or a JSONL file"


def _common_setup(out: Path, seed: int) -> None:
    import torch
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} exists and is not a directory")
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# heatmap (sec. 4.1, Fig. 2; App. E, H)
# --------------------------------------------------------------------------------------


def _visible(token: str) -> str:
    """A token label whose spaces and line breaks can be seen (' =' and '=' differ)."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


def _draw_heat(ax, tokens: list[str], values: list[float], vmax: float, marked: set[int], title: str,
               width: int = 80) -> int:
    """Tokens as shaded monospace boxes wrapped at `width` characters; returns the line count."""
    from services.cli.analyze_report import heat_color

    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")
    col, row = 0, 0
    placed = []
    for t, (tok, v) in enumerate(zip(tokens, values)):
        shown = tok.replace("\n", "⏎")
        if col + len(shown) > width and col > 0:
            col, row = 0, row + 1
        placed.append((col, row, shown, v, t))
        col += max(len(shown), 1)
        if "\n" in tok:
            col, row = 0, row + 1
    lines = row + 1
    ax.set_xlim(0, width)
    ax.set_ylim(lines, 0)
    for col, row, shown, v, t in placed:
        ax.text(col, row + 0.5, shown, family="monospace", fontsize=8, va="center", ha="left",
                bbox=dict(boxstyle="square,pad=0.15", fc=heat_color(v, vmax),
                          ec="#222" if t in marked else "none", lw=1.0))
    return lines


@analyze_app.command("heatmap")
def heatmap_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option("builtin", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(Path("analysis/heatmap"), "--out", "-o", help="output directory"),
    num_problems: int = typer.Option(4, "--num-problems", min=1, help="problems to sample"),
    samples: int = typer.Option(8, "--samples", min=1, help="rollouts per problem (peers for the teacher context)"),
    rollouts: int = typer.Option(4, "--rollouts", min=1, help="rollouts shown (correct ones first)"),
    critical: int = typer.Option(3, "--critical", min=1, help="top-D̄_t positions per rollout with candidates"),
    pool: int = typer.Option(100, "--pool", min=1, help="candidates: union of both views' top-POOL tokens"),
    candidates: int = typer.Option(4, "--candidates", min=1, help="explore / exploit candidates shown per position"),
    full_vocab_max_mb: float = typer.Option(512.0, "--full-vocab-max-mb", min=0.0,
                                            help="largest [T, V] rows of one rollout (both views) scored in full; "
                                                 "longer rollouts use the top-k estimate of D̄_t"),
    topk: int = typer.Option(100, "--topk", min=1, help="k of the top-k D̄_t estimate"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="answer extraction (default: last_number for arithmetic, else boxed)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="problems per engine call"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """D̄_t = KL(P_S || P_T) shaded on every token of sampled rollouts; explore/exploit candidates
    at the top critical positions (paper sec. 4.1, Fig. 2; App. E, H)."""
    import torch
    from rlrt_core.algorithms import position_asymmetry, position_asymmetry_topk
    from rlrt_core.scoring import score_views
    _common_setup(out, seed)
    name, problems = load_problems_arg(data, num_problems)
    t0 = time.perf_counter()
    try:
        engine = load_engine(model, dtype=dtype, device=device)
    except (ValueError, OSError, RuntimeError) as err:
        _fail(f"--model {model}: {err}")
    tok, net = engine.tokenizer, engine.model
    V = engine.vocab_size
    vmode = default_mode(data, mode)
    with Verifier(mode=vmode, timeout_s=5.0, workers=1) as verifier, _progress() as progress:
        groups = sample_rollouts(engine, verifier, problems, n=samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, batch=batch_size, progress=progress,
                                 label="heatmap")
    # Shown rollouts: correct ones first (RLRT reweights those, eq. 7), round-robin over problems.
    order = sorted(((ro.reward < 0.5, j, i) for i, g in enumerate(groups) for j, ro in enumerate(g)))
    chosen = []
    for _, j, i in order:
        ro = groups[i][j]
        if len(chosen) < rollouts and ro.token_ids and teacher_context(ro, groups[i]) is not None:
            chosen.append((i, ro))
    if not chosen:
        _fail("no rollout has a teacher context (no reference solution and no correct peer); "
              "use data with solutions or more --samples")
    report = Report(out, f"rlrt analyze heatmap: {model} on {name}")
    results = []
    all_dbar: list[float] = []
    with _progress() as progress:
        task = progress.add_task("scoring both views", total=len(chosen))
        for i, ro in chosen:
            ctx = teacher_context(ro, groups[i])
            T = len(ro.token_ids)
            full = 2 * T * V * 4 / 2**20 <= full_vocab_max_mb
            if full:
                s_rows, t_rows = view_rows(net, tok, ro, ctx)
                d_bar = position_asymmetry(s_rows, t_rows).float()
                d_hat = (s_rows.gather(-1, torch.tensor(ro.token_ids)[:, None]) -
                         t_rows.gather(-1, torch.tensor(ro.token_ids)[:, None])).squeeze(-1)
            else:
                t_prompt = teacher_prompt_ids(tok, ro.problem.prompt, ctx)
                s, t = score_views(net, [ro.prompt_ids], [t_prompt], [ro.token_ids], topk=min(topk, V))
                d_bar = position_asymmetry_topk(s.topk_ids[0], s.topk_logprobs[0], t.topk_ids[0],
                                                t.topk_logprobs[0]).float()
                d_hat = s.logprobs[0] - t.logprobs[0]
            crit = an.top_positions(d_bar, critical)
            if not full:  # candidates need full rows at the critical positions only
                s_rows, t_rows = view_rows(net, tok, ro, ctx)
            cands = []
            for t_pos in crit:
                c = an.critical_candidates(s_rows[t_pos], t_rows[t_pos], pool=pool, n=candidates)
                for side in ("explore", "exploit"):
                    for e in c[side]:
                        e["token"] = tok.decode([e["id"]])
                cands.append({"position": t_pos, "token": tok.decode([ro.token_ids[t_pos]]),
                              "d_bar": float(d_bar[t_pos]), **c})
            del s_rows, t_rows
            all_dbar.extend(d_bar.tolist())
            results.append({"problem_id": ro.problem.id, "prompt": ro.problem.prompt, "reward": ro.reward,
                            "context": "solution" if ro.problem.solution else "peer",
                            "d_bar_method": "full_vocabulary" if full else f"top{min(topk, V)}_estimate",
                            "tokens": token_texts(tok, ro.token_ids), "token_ids": ro.token_ids,
                            "d_bar": d_bar.tolist(), "d_hat": d_hat.tolist(), "critical": cands})
            progress.advance(task)
    vmax = max(max(all_dbar), 1e-9)
    methods = sorted({r["d_bar_method"] for r in results})
    report.text(f"{len(results)} rollouts of {len(groups)} problems ({samples} samples each, T={temperature}); "
                f"teacher context: the reference solution, else a correct peer rollout. D̄_t computed by "
                f"{' and '.join(methods)} (full vocabulary of {V} tokens when 2·T·V·4 bytes ≤ "
                f"{full_vocab_max_mb:g} MB, else the top-{topk} estimate of rlrt_core.algorithms."
                f"position_asymmetry_topk). Candidates: union of both views' top-{pool} tokens at each of the "
                f"{critical} largest-D̄_t positions; green = largest P_S − P_T (explore, D̂ > 0), pink = largest "
                f"P_T − P_S (exploit, D̂ < 0). Colour scale 0 … {vmax:.3g} nats.")
    # Figure 1: every shown rollout as a token heat-map.
    heights = []
    for r in results:
        chars = sum(max(len(t.replace("\n", "⏎")), 1) for t in r["tokens"]) + 10 * sum("\n" in t for t in r["tokens"])
        heights.append(max(1, math.ceil(chars / 80)))
    fig, axes = pyplot().subplots(len(results), 1, figsize=(10, 0.3 * sum(heights) + 0.45 * len(results)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        verdict = "correct" if r["reward"] >= 0.5 else "wrong"
        _draw_heat(ax, r["tokens"], r["d_bar"], vmax, {c["position"] for c in r["critical"]},
                   f"{r['problem_id']} ({verdict}): max D̄ = {max(r['d_bar']):.3g} nats; boxed = critical positions")
    report.heading("Full-trajectory heat-maps of D̄_t (App. H)")
    report.figure(fig, "heatmap", "Each token shaded by D̄_t = KL(P_S‖P_T): pink = routine, green = critical. "
                                  "Outlined tokens: the top critical positions.")
    for r in results:
        report.raw(token_heat_html(r["tokens"], r["d_bar"], vmax, f"{r['problem_id']} reward={r['reward']:g}",
                                   {c["position"] for c in r["critical"]}))
    # Figure 2: candidates at the critical positions (Fig. 2's right panels).
    panels = [(ri, c) for ri, r in enumerate(results) for c in r["critical"]]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(4.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (ri, c) in zip(axes.flat, panels):
        ax.set_axis_on()
        rows = [(e["token"], e["p_student"] - e["p_teacher"], GREEN) for e in c["explore"]] + \
               [(e["token"], e["p_student"] - e["p_teacher"], PINK) for e in c["exploit"]]
        if rows:
            ax.barh(range(len(rows)), [v for _, v, _ in rows], color=[col for _, _, col in rows])
            ax.set_yticks(range(len(rows)), [_visible(t)[:14] for t, _, _ in rows], fontsize=7, family="monospace")
            ax.invert_yaxis()
        ax.axvline(0, color="#333", lw=0.6)
        ax.set_title(f"#{ri} t={c['position']} {c['token']!r} D̄={c['d_bar']:.3g}", fontsize=8)
        ax.set_xlabel("P_S − P_T", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    report.heading("Critical positions: explore / exploit candidates (sec. 4.1, Fig. 2)")
    report.figure(fig, "candidates", "Green: the largest P_S − P_T (explore). Pink: the largest P_T − P_S (exploit).")
    for ri, r in enumerate(results):
        report.table(["rollout", "t", "sampled", "D̄_t", "explore (P_S−P_T)", "exploit (P_T−P_S)"],
                     [[ri, c["position"], repr(c["token"]), c["d_bar"],
                       ", ".join(f"{e['token']!r} {e['p_student'] - e['p_teacher']:+.3f}" for e in c["explore"]),
                       ", ".join(f"{e['token']!r} {e['p_teacher'] - e['p_student']:+.3f}" for e in c["exploit"])]
                      for c in r["critical"]])
    # Figure 3: distribution of D̄_t over all shown positions (sparsity of critical positions, App. H).
    fig, ax = pyplot().subplots(figsize=(6, 3))
    vals = torch.tensor(all_dbar).clamp_min(1e-8)
    ax.hist(vals.log10().tolist(), bins=40, color=GREY)
    ax.set_xlabel("log10 D̄_t (nats)")
    ax.set_ylabel("positions")
    report.heading("Distribution of D̄_t")
    report.figure(fig, "dbar_hist", "D̄_t over every position of the shown rollouts (log scale).")
    q = torch.quantile(torch.tensor(all_dbar, dtype=torch.float64), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    summary = {"positions": len(all_dbar), "d_bar_mean": sum(all_dbar) / len(all_dbar),
               "d_bar_p50": float(q[0]), "d_bar_p90": float(q[1]), "d_bar_p99": float(q[2]), "d_bar_max": max(all_dbar),
               "accuracy": sum(ro.reward for g in groups for ro in g) / sum(len(g) for g in groups)}
    report.table(list(summary), [list(summary.values())])
    numbers = {"command": "heatmap", "model": model, "data": name, "num_problems": len(problems),
               "samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens, "pool": pool,
               "topk": topk, "vocab_size": V, "seconds": time.perf_counter() - t0, "summary": summary,
               "rollouts": results}
    _finish(report, numbers, t0)


def _finish(report: Report, numbers: dict[str, Any], t0: float) -> None:
    numbers["seconds"] = time.perf_counter() - t0
    json_path, html_path = report.write(numbers)
    console.print(f"wrote {html_path}, {json_path} and {len(report.figures)} figure(s) in {numbers['seconds']:.1f} s")


# --------------------------------------------------------------------------------------
# markers (sec. 4.3, Fig. 3; App. D)
# --------------------------------------------------------------------------------------


@analyze_app.command("markers")
def markers_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option("builtin", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(Path("analysis/markers"), "--out", "-o", help="output directory"),
    num_problems: int = typer.Option(20, "--num-problems", min=1, help="problems to sample (100 in the paper)"),
    samples: int = typer.Option(8, "--samples", min=2, help="rollouts per problem (8 in the paper)"),
    min_count: int = typer.Option(30, "--min-count", min=0, help="minimum e_v + x_v of a token type (30 in the paper)"),
    z_threshold: float = typer.Option(3.0, "--z", min=0.0, help="keep |z_v| >= this (3 in the paper)"),
    alpha: float = typer.Option(an.ALPHA, "--alpha", min=1e-9, help="log-odds smoothing (0.5 in the paper)"),
    any_outcome: bool = typer.Option(False, "--any-outcome",
                                     help="take the first two rollouts of every problem whatever their rewards "
                                          "(models that solve nothing or everything; not the paper's selection)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="answer extraction (default: last_number for arithmetic, else boxed)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Explore/exploit markers: per position the vocabulary arg-max and arg-min of D̂_t(v), smoothed
    log-odds z-scores (Monroe et al.), filters and stop words of App. D; plots like Fig. 3."""
    _common_setup(out, seed)
    name, problems = load_problems_arg(data, num_problems)
    t0 = time.perf_counter()
    try:
        engine = load_engine(model, dtype=dtype, device=device)
    except (ValueError, OSError, RuntimeError) as err:
        _fail(f"--model {model}: {err}")
    tok, net = engine.tokenizer, engine.model
    vmode = default_mode(data, mode)
    with Verifier(mode=vmode, timeout_s=5.0, workers=1) as verifier, _progress() as progress:
        groups = sample_rollouts(engine, verifier, problems, n=samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, batch=batch_size, progress=progress,
                                 label="markers")
    # App. D: one correct and one incorrect trajectory per problem.
    kept: list[tuple[Rollout, list[Rollout]]] = []
    skipped = Counter()
    for g in groups:
        right = next((r for r in g if r.reward >= 0.5 and r.token_ids), None)
        wrong = next((r for r in g if r.reward < 0.5 and r.token_ids), None)
        if any_outcome:
            pair = [r for r in g if r.token_ids][:2]
        elif right is None or wrong is None:
            skipped["not_both_outcomes"] += 1
            continue
        else:
            pair = [right, wrong]
        for ro in pair:
            if teacher_context(ro, g) is None:
                skipped["no_context"] += 1
            else:
                kept.append((ro, g))
    if not kept:
        _fail(f"none of {len(groups)} problems has both a correct and an incorrect rollout among {samples} "
              "samples; raise --num-problems or --samples, or use a model that solves some problems")
    explore, exploit = Counter(), Counter()
    positions = 0
    with _progress() as progress:
        task = progress.add_task("arg-max/arg-min of D̂_t(v)", total=len(kept))
        for ro, g in kept:
            s_rows, t_rows = view_rows(net, tok, ro, teacher_context(ro, g))
            e_ids, x_ids = an.extreme_tokens(s_rows, t_rows)
            explore.update(an.normalize_token(tok.decode([i])) for i in e_ids.tolist())
            exploit.update(an.normalize_token(tok.decode([i])) for i in x_ids.tolist())
            positions += len(ro.token_ids)
            progress.advance(task)
    stops = an.english_stop_words() | an.math_stop_words()
    table = an.select_markers(explore, exploit, alpha=alpha, min_count=min_count, z_threshold=z_threshold,
                              stop_words=stops)
    markers = [r for r in table if r["marker"]]
    report = Report(out, f"rlrt analyze markers: {model} on {name}")
    selection = ("the first two rollouts of each problem (--any-outcome)" if any_outcome else
                 f"one correct and one incorrect rollout per problem among {samples}")
    report.text(f"{len(kept)} trajectories: {selection}; problems or rollouts skipped: {dict(skipped) or 'none'}; "
                f"{positions} positions. "
                f"At every position the vocabulary arg-max of D̂_t(v) joins the explore corpus and the arg-min the "
                f"exploit corpus (App. D). Tokens are decoded, stripped and lower-cased; z_v is eq. 8 with α={alpha:g} "
                f"over the whole corpora (E = X = {positions}). Markers: ASCII alphabetic 3–15 characters, "
                f"e_v + x_v ≥ {min_count}, |z_v| ≥ {z_threshold:g}, not among {len(an.english_stop_words())} NLTK "
                f"English stop words nor {len(an.math_stop_words())} maths stop words.")
    words = [r for r in table if r["word"]]
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    ax = axes[0]
    grey = [r for r in words if not r["marker"]]
    ax.scatter([r["log2_ratio"] for r in grey], [math.log10(r["explore"] + r["exploit"]) for r in grey],
               s=6, color=GREY, alpha=0.5, label="other word tokens")
    for side, col in (("explore", GREEN), ("exploit", PINK)):
        pts = [r for r in markers if r["side"] == side]
        ax.scatter([r["log2_ratio"] for r in pts], [math.log10(r["explore"] + r["exploit"]) for r in pts],
                   s=18, color=col, label=f"{side} markers ({len(pts)})")
        for r in sorted(pts, key=lambda r: -abs(r["z"]))[:8]:
            ax.annotate(r["token"], (r["log2_ratio"], math.log10(r["explore"] + r["exploit"])), fontsize=7)
    ax.axvline(0, color="#333", lw=0.5)
    ax.set_xlabel("log2(n_explore / n_exploit)  (α-smoothed)")
    ax.set_ylabel("log10(n_explore + n_exploit)")
    ax.set_title("(a) word tokens", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    if markers:
        shown = markers if len(markers) <= 40 else sorted(markers, key=lambda r: -abs(r["z"]))[:40]
        shown = sorted(shown, key=lambda r: r["z"])
        ax.bar(range(len(shown)), [r["z"] for r in shown],
               color=[GREEN if r["z"] > 0 else PINK for r in shown])
        ax.set_xticks(range(len(shown)), [r["token"] for r in shown], rotation=75, fontsize=7)
        ax.set_ylabel("z_v (eq. 8)")
    else:
        ax.text(0.5, 0.5, f"no token passed the filters\n(min count {min_count}, |z| ≥ {z_threshold:g})",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("(b) per-marker polarization, exploit (left) to explore (right)", fontsize=9)
    fig.tight_layout()
    report.heading("Markers (Fig. 3)")
    report.figure(fig, "markers", "(a) volcano scatter of word tokens; green/pink = explore/exploit markers. "
                                  "(b) z_v of every marker (40 largest |z| when more).")
    report.table(["token", "side", "z", "explore", "exploit"],
                 [[r["token"], r["side"], r["z"], r["explore"], r["exploit"]]
                  for r in sorted(markers, key=lambda r: -abs(r["z"]))])
    report.heading("Most polarized word tokens before stop-word removal")
    report.table(["token", "z", "explore", "exploit", "frequent", "stop word"],
                 [[r["token"], r["z"], r["explore"], r["exploit"], r["frequent"], r["stop_word"]]
                  for r in sorted(words, key=lambda r: -abs(r["z"]))[:30]])
    numbers = {"command": "markers", "model": model, "data": name, "num_problems": len(problems), "samples": samples,
               "any_outcome": any_outcome, "trajectories": len(kept), "positions": positions, "skipped": dict(skipped), "alpha": alpha,
               "min_count": min_count, "z_threshold": z_threshold,
               "stop_words": {"nltk_english": len(an.english_stop_words()), "maths": len(an.math_stop_words())},
               "n_markers": {"explore": sum(r["side"] == "explore" for r in markers),
                             "exploit": sum(r["side"] == "exploit" for r in markers)},
               "markers": markers, "tokens": table}
    _finish(report, numbers, t0)


# --------------------------------------------------------------------------------------
# reflection (sec. 6.2, Fig. 6)
# --------------------------------------------------------------------------------------


def reflection_for_model(engine, verifier: Verifier, problems: list[Problem], *, samples: int, max_new_tokens: int,
                         temperature: float, seed: int, batch: int, reflection: str, max_rollouts: int,
                         progress: Progress, label: str) -> dict[str, Any]:
    """Sec. 6.2 on one model: sample, split hard/easy, inject at max_kl/random/min_kl, continue, verify."""
    from rlrt_core.algorithms import position_asymmetry
    from rlrt_core.engines.base import SamplingParams
    tok, net = engine.tokenizer, engine.model
    groups = sample_rollouts(engine, verifier, problems, n=samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, batch=batch, progress=progress, label=label)
    rng = random.Random(seed)
    subsets = Counter()
    todo: list[tuple[str, Rollout, list[Rollout]]] = []
    for g in groups:
        n_correct = sum(ro.reward >= 0.5 for ro in g)
        sub = an.difficulty(n_correct, len(g))
        subsets[sub or "neither"] += 1
        for ro in g:
            # hard subset: wrong rollouts (flip->R); easy subset: correct ones (flip->W)
            if (sub == "hard" and ro.reward < 0.5) or (sub == "easy" and ro.reward >= 0.5):
                todo.append((sub, ro, g))
    per_subset = Counter()
    picked = []
    for sub, ro, g in todo:
        if per_subset[sub] < max_rollouts and ro.body_len >= 1 and teacher_context(ro, g) is not None:
            per_subset[sub] += 1
            picked.append((sub, ro, g))
    reflect_ids = tok.encode(" " + reflection.strip(), add_special_tokens=False)
    jobs = []  # (subset, site, rollout, position)
    task = progress.add_task(f"{label}: D̄_t of {len(picked)} rollouts", total=len(picked))
    for sub, ro, g in picked:
        s_rows, t_rows = view_rows(net, tok, ro, teacher_context(ro, g))
        d_bar = position_asymmetry(s_rows[:ro.body_len], t_rows[:ro.body_len]).float()
        for site, pos in an.injection_positions(d_bar, rng).items():
            jobs.append((sub, site, ro, pos, float(d_bar[pos])))
        progress.advance(task)
    records = []
    task = progress.add_task(f"{label}: continuing {len(jobs)} injections", total=len(jobs))
    for s in range(0, len(jobs), max(batch * 4, 1)):
        chunk = jobs[s:s + batch * 4]
        prompts = [ro.prompt_ids + ro.token_ids[:pos] + reflect_ids for _, _, ro, pos, _ in chunk]
        res = engine.generate(prompts, SamplingParams(n=1, temperature=temperature, max_new_tokens=max_new_tokens,
                                                      seed=seed + 7919 + s))
        texts = [tok.decode(ro.token_ids[:pos] + reflect_ids + r.completions[0].token_ids, skip_special_tokens=True)
                 for (_, _, ro, pos, _), r in zip(chunk, res)]
        try:
            verdicts = verifier.verify(texts, [ro.problem.answer for _, _, ro, _, _ in chunk])
        except RuntimeError as err:
            _fail(f"verifier: {err}")
        for (sub, site, ro, pos, dv), v, text in zip(chunk, verdicts, texts):
            records.append({"problem_id": ro.problem.id, "subset": sub, "site": site, "position": pos,
                            "d_bar": dv, "before": ro.reward, "after": v.reward, "continued": text})
        progress.advance(task, len(chunk))
    return {"accuracy": sum(ro.reward for g in groups for ro in g) / sum(len(g) for g in groups),
            "subsets": dict(subsets), "injected_rollouts": dict(per_subset), "rates": an.flip_rates(records),
            "records": records}


@analyze_app.command("reflection")
def reflection_cmd(
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="run directory: its base model (step 0) "
                                               "and every checkpoint under checkpoints/"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (instead of --checkpoints)"),
    data: str = typer.Option("builtin", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(Path("analysis/reflection"), "--out", "-o", help="output directory"),
    num_problems: int = typer.Option(20, "--num-problems", min=1, help="problems (100 in the paper)"),
    max_rollouts: int = typer.Option(32, "--max-rollouts", min=1, help="injected rollouts per subset and model"),
    reflection: str = typer.Option(an.REFLECTION_TEXT, "--reflection", help="text injected at the chosen token"),
    no_base: bool = typer.Option(False, "--no-base", help="with --checkpoints: skip the base model (step 0)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="answer extraction (default: last_number for arithmetic, else boxed)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Reflection injection (paper sec. 6.2, Fig. 6): "Wait, let me reconsider." replaces the token at
    argmax D̄_t, a random position or argmin D̄_t; flip→R on hard problems (0-2 of 8 correct), flip→W on
    easy ones (5-7 of 8), per checkpoint."""
    if (checkpoints is None) == (model is None):
        _fail("give exactly one of --checkpoints RUN_DIR or --model PATH")
    _common_setup(out, seed)
    name, problems = load_problems_arg(data, num_problems)
    t0 = time.perf_counter()
    models: list[tuple[int, str]] = []
    if checkpoints is not None:
        try:
            base, _ = run_base_model(checkpoints)
        except ValueError as err:
            _fail(f"--checkpoints {checkpoints}: {err}")
        if not no_base:
            models.append((0, base))
        models += [(step, str(p)) for step, p in run_checkpoints(checkpoints)]
        if not models:
            _fail(f"--checkpoints {checkpoints}: no checkpoints under {checkpoints / 'checkpoints'}")
    else:
        try:
            models.append((max(resolve_model_spec(model)[2], 0), model))
        except ValueError as err:
            _fail(f"--model {model}: {err}")
    vmode = default_mode(data, mode)
    per_model = []
    with Verifier(mode=vmode, timeout_s=5.0, workers=1) as verifier, _progress() as progress:
        overall = progress.add_task("models", total=len(models))
        for step, spec in models:
            try:
                engine = load_engine(spec, dtype=dtype, device=device)
            except (ValueError, OSError, RuntimeError) as err:
                _fail(f"model {spec}: {err}")
            res = reflection_for_model(engine, verifier, problems, samples=8, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=seed, batch=batch_size, reflection=reflection,
                                       max_rollouts=max_rollouts, progress=progress, label=f"step {step}")
            per_model.append({"step": step, "model": spec, **res})
            del engine
            progress.advance(overall)
    report = Report(out, f"rlrt analyze reflection: {checkpoints or model} on {name}")
    report.text(f"{len(problems)} problems, 8 rollouts each per model. Hard subset: 0–2 correct of 8, wrong "
                f"rollouts injected (flip→R = became right); easy subset: 5–7 of 8, correct rollouts injected "
                f"(flip→W = became wrong); at most {max_rollouts} rollouts per subset and model. "
                f"{reflection!r} replaces the token at argmax_t D̄_t (max_kl), a uniform random position "
                f"(random) or argmin_t D̄_t (min_kl), excluding the final EOS; the model then continues "
                f"(T={temperature}, ≤ {max_new_tokens} tokens) and the prefix + reflection + continuation is "
                f"verified. D̄_t uses the full vocabulary and the reference solution (else a correct peer) as "
                f"the teacher context.")
    markers_ = {"max_kl": "s", "random": "o", "min_kl": "^"}
    colors = {"max_kl": GREEN, "random": GREY, "min_kl": PINK}
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8))
    steps = [m["step"] for m in per_model]
    for ax, kind, title in ((axes[0], "flip_to_R", "(a) flip→R, hard subset"),
                            (axes[1], "flip_to_W", "(b) flip→W, easy subset")):
        for site in an.INJECTION_SITES:
            ys = [m["rates"][kind][site]["rate"] for m in per_model]
            ax.plot(steps, [100 * y if math.isfinite(y) else float("nan") for y in ys], marker=markers_[site],
                    color=colors[site], label=site)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("rate (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.heading("Flip rates per checkpoint (Fig. 6)")
    report.figure(fig, "reflection", "Reflection injected at max_kl (■), random (●) or min_kl (▲). Missing points: "
                                     "no rollout of that subset.")
    rows = []
    for m in per_model:
        for kind in ("flip_to_R", "flip_to_W"):
            for site in an.INJECTION_SITES:
                r = m["rates"][kind][site]
                rows.append([m["step"], kind, site, r["rate"], r["flips"], r["n"]])
    report.table(["step", "rate", "site", "value", "flips", "n"], rows)
    report.table(["step", "accuracy", "hard problems", "easy problems", "other"],
                 [[m["step"], m["accuracy"], m["subsets"].get("hard", 0), m["subsets"].get("easy", 0),
                   m["subsets"].get("neither", 0)] for m in per_model])
    numbers = {"command": "reflection", "source": str(checkpoints or model), "data": name,
               "num_problems": len(problems), "samples": 8, "reflection": reflection, "max_rollouts": max_rollouts,
               "temperature": temperature, "max_new_tokens": max_new_tokens, "models": per_model}
    _finish(report, numbers, t0)


# --------------------------------------------------------------------------------------
# shift (sec. 6.3, Fig. 7)
# --------------------------------------------------------------------------------------


@analyze_app.command("shift")
def shift_cmd(
    base: str = typer.Option(..., "--base", help="π_base: " + MODEL_HELP),
    ft: str = typer.Option(..., "--ft", help="π_ft (fine-tuned): " + MODEL_HELP),
    data: str = typer.Option("builtin", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(Path("analysis/shift"), "--out", "-o", help="output directory"),
    num_problems: int = typer.Option(40, "--num-problems", min=1, help="problems screened for hard ones"),
    hard_prompts: int = typer.Option(30, "--hard-prompts", min=1, help="hard prompts used (30 in the paper)"),
    ft_rollouts: int = typer.Option(1, "--ft-rollouts", min=1, help="π_ft rollouts per hard prompt"),
    all_prompts: bool = typer.Option(False, "--all-prompts", help="use every screened prompt, not only hard ones"),
    js_high: float = typer.Option(an.JS_HIGH, "--js-high", min=0.0, help="high-divergence threshold (0.1 in the paper)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="answer extraction (default: last_number for arithmetic, else boxed)"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Where and how π_ft's next-token distribution moved from π_base (paper sec. 6.3, Fig. 7): CCDF of
    JS(π_ft‖π_base) over positions of π_ft rollouts on hard prompts, top-k overlap and tail promotion at
    positions with JS > 0.1."""
    import torch
    from rlrt_core.scoring import logprob_rows
    _common_setup(out, seed)
    name, problems = load_problems_arg(data, num_problems)
    t0 = time.perf_counter()
    try:
        base_eng = load_engine(base, dtype=dtype, device=device)
        ft_eng = load_engine(ft, dtype=dtype, device=device)
    except (ValueError, OSError, RuntimeError) as err:
        _fail(f"--base/--ft: {err}")
    if base_eng.vocab_size != ft_eng.vocab_size:
        _fail(f"--base has a vocabulary of {base_eng.vocab_size} tokens but --ft has {ft_eng.vocab_size}")
    vmode = default_mode(data, mode)
    ks = list(range(1, 21))
    with Verifier(mode=vmode, timeout_s=5.0, workers=1) as verifier, _progress() as progress:
        groups = sample_rollouts(base_eng, verifier, problems, n=8, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, batch=batch_size, progress=progress,
                                 label="π_base difficulty")
        n_correct = [sum(ro.reward >= 0.5 for ro in g) for g in groups]
        chosen = [p for p, c in zip(problems, n_correct) if all_prompts or c in an.HARD_N_CORRECT][:hard_prompts]
        if not chosen:
            _fail(f"no hard prompt (0-2 of 8 correct under --base) among {len(problems)}; raise --num-problems "
                  "or pass --all-prompts")
        ft_groups = sample_rollouts(ft_eng, verifier, chosen, n=ft_rollouts, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=seed + 1, batch=batch_size, progress=progress,
                                    label="π_ft rollouts")
        rollouts = [ro for g in ft_groups for ro in g if ro.token_ids]
        stats = []
        task = progress.add_task("JS(π_ft‖π_base) per position", total=len(rollouts))
        for ro in rollouts:
            (f_rows,) = logprob_rows(ft_eng.model, [ro.prompt_ids], [ro.token_ids])
            (b_rows,) = logprob_rows(base_eng.model, [ro.prompt_ids], [ro.token_ids])
            stats.append(an.shift_statistics(f_rows, b_rows, js_high=js_high, ks=ks))
            progress.advance(task)
    js = torch.cat([s["js"] for s in stats])
    overlap = torch.cat([s["overlap"] for s in stats])
    base_p = torch.cat([s["base_prob_of_new_top1"] for s in stats])
    x_grid = torch.logspace(-4, math.log10(math.log(2)), 40, dtype=torch.float64)
    ccdf = an.ccdf(js, x_grid)
    tail = an.tail_promotion(base_p, an.BASE_PROB_THRESHOLDS)
    mean_overlap = overlap.mean(0) if overlap.shape[0] else torch.full((len(ks),), math.nan, dtype=torch.float64)
    summary = {"positions": int(js.numel()), "high_divergence": int(overlap.shape[0]),
               "high_fraction": float((js > js_high).double().mean()), "js_mean": float(js.mean()),
               "js_max": float(js.max()), "overlap_at_1": float(mean_overlap[0]), "overlap_at_20": float(mean_overlap[-1]),
               "base_accuracy": sum(n_correct) / (8 * len(groups)),
               "ft_accuracy_on_chosen": sum(ro.reward for ro in rollouts) / len(rollouts)}
    report = Report(out, f"rlrt analyze shift: {ft} vs {base} on {name}")
    report.text(f"{len(chosen)} {'prompts' if all_prompts else 'hard prompts (0–2 of 8 correct under π_base)'} of "
                f"{len(problems)} screened; {ft_rollouts} π_ft rollout(s) each, {summary['positions']} positions. "
                f"At every position of a π_ft rollout both models' full next-token distributions are compared on "
                f"the same prefix. High-divergence: JS > {js_high:g} nats ({summary['high_divergence']} positions).")
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(x_grid.tolist(), ccdf.tolist(), color=GREEN)
    ax.axvline(js_high, color="#333", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("JS(π_ft‖π_base) threshold x (nats)")
    ax.set_ylabel("fraction of positions with JS > x")
    ax.set_title("(a) CCDF of JS", fontsize=9)
    ax = axes[1]
    ax.plot(ks, mean_overlap.tolist(), marker="o", ms=3, color=GREEN)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k")
    ax.set_ylabel("|top-k(ft) ∩ top-k(base)| / k")
    ax.set_title(f"(b) top-k overlap at JS > {js_high:g} (n={summary['high_divergence']})", fontsize=9)
    ax = axes[2]
    ax.bar([f"<1e-{i}" for i in range(1, 7)], tail.tolist(), color=GREEN)
    ax.set_ylabel("fraction of high-divergence positions")
    ax.set_xlabel("π_base probability of π_ft's top-1")
    ax.set_title("(c) tail promotion", fontsize=9)
    fig.tight_layout()
    report.heading("Distributional shift (Fig. 7)")
    report.figure(fig, "shift", "(a) CCDF of JS over all positions, dashed: the high-divergence threshold. "
                                "(b) top-k overlap at high-divergence positions. (c) fraction of those positions "
                                "whose new top-1 had base probability below each threshold.")
    report.table(list(summary), [list(summary.values())])
    report.table(["k", *map(str, ks)], [["overlap", *mean_overlap.tolist()]])
    report.table(["threshold", *[f"{t:g}" for t in an.BASE_PROB_THRESHOLDS]], [["fraction", *tail.tolist()]])
    numbers = {"command": "shift", "base": base, "ft": ft, "data": name, "num_problems": len(problems),
               "chosen_prompts": [p.id for p in chosen], "base_n_correct": n_correct, "ft_rollouts": ft_rollouts,
               "js_high": js_high, "summary": summary, "ccdf": {"x": x_grid, "fraction": ccdf},
               "topk_overlap": {"k": ks, "mean": mean_overlap},
               "tail_promotion": {"threshold": list(an.BASE_PROB_THRESHOLDS), "fraction": tail},
               "js_per_position": js}
    _finish(report, numbers, t0)
