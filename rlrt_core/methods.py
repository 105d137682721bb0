"""Training methods as data: one `MethodSpec` per method, looked up by name.

A method is everything the pipeline needs to know about it:

    weight      per-token weight w_t and trajectory gate of the GRPO-family shaping rule (eq. 7,
                Table 4), `(A [B], r [B], log P_S [B,T], log P_T [B,T] | None) -> (w [B,T], gate [B])`;
                None for a method whose loss does not use shaped advantages
    loss        name of a loss registered in `rlrt_core.losses`
    teacher     which rollouts the teacher scorer scores (`teacher_scores`: none / correct / all)
                in which groups (`score_groups`: mixed rewards / at least one success / every group),
                with which privileged context (`context`), and whether it ships the student's
                top-k support (`needs_topk`) and the teacher's entropy (`needs_teacher_entropy`)
    defaults    advantage std normalisation and the entropy-bonus coefficient

Built-ins (paper sec. 6.1, 6.4, App. G.1):

    name      loss  teacher scores                        context            norm  entropy
    grpo      ppo   none                                  -                  off   0
    grpo_eb   ppo   none                                  -                  off   1e-3
    rlsd      ppo   all rollouts of mixed groups          solution_or_peer   on    0
    rlrt      ppo   correct rollouts of mixed groups      solution_or_peer   on    0
    rlrt_all  ppo   all rollouts of mixed groups          solution_or_peer   on    0
    sdpo      sdpo  all rollouts of groups with a success peer (successful   off   0
                                                          sibling)
    srpo      srpo  failed rollouts of groups with a success  peer           off   0

The recipe's `teacher.context` decides the context of every method that uses one: RLSD/RLRT
default to `solution_or_peer`, SDPO/SRPO (Hübotter et al. 2026, arXiv 2601.20802; Li et al.
2026, arXiv 2604.02288) to `peer`, a successful sibling rollout, never the rollout itself;
set `teacher.context: solution` to distil from the reference solution instead.

One definition of a correct rollout, `is_correct`, serves the gates, the teacher's choice of
rollouts and of peer contexts, and the learner's routing.

A new method is one registration, e.g. in a plugin module named by `algorithm.plugins`:

    @register_method("my_method")
    def my_weight(advantages, rewards, student, teacher): ...

which registers a PPO-loss spec with the RLRT-family defaults; `register_method(MethodSpec(...))`
registers any spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, overload

if TYPE_CHECKING:  # torch is imported where a weight is computed: config validation
    from torch import Tensor  # (launcher, verifier) must not load it (~250 MB per process)

__all__ = [
    "CORRECT_REWARD",
    "MethodSpec",
    "WeightFn",
    "correct_mask",
    "get_method",
    "is_correct",
    "method_names",
    "register_method",
    "rollouts_to_score",
    "unregister_method",
    "weight_functions",
]

# A rollout is correct when its verifiable reward reaches this value (R in {0, 1}, sec. 3).
CORRECT_REWARD = 1.0

WeightFn = Callable[["Tensor", "Tensor", "Tensor", "Tensor | None"], "tuple[Tensor, Tensor]"]
TeacherScores = Literal["none", "correct", "failed", "all"]
ScoreGroups = Literal["mixed", "has_success", "all"]
Context = Literal["solution", "peer", "solution_or_peer"]


def is_correct(reward: float) -> bool:
    """The one definition of a correct rollout: reward >= CORRECT_REWARD (= 1.0)."""
    return float(reward) >= CORRECT_REWARD


def correct_mask(rewards: Tensor) -> Tensor:
    """[B] bool: `is_correct` elementwise on a reward tensor."""
    return rewards >= CORRECT_REWARD


@dataclass(frozen=True)
class MethodSpec:
    """Everything the teacher scorer and the learner need to know about one method.

    name: registry key (`algorithm.method`).
    weight: GRPO-family weight and gate (see module docstring), or None when the loss does not
        use shaped token advantages (SDPO).
    loss: name of a loss in `rlrt_core.losses` ("ppo", "sdpo", "srpo", or a plugin's).
    teacher_scores: which rollouts of a selected group the teacher scores: "none" (no teacher),
        "correct" (is_correct only), "failed" (the others) or "all".
    score_groups: which groups are selected: "mixed" (rewards not all equal: other groups have
        A = 0, so their token advantages are 0 whatever w_t is), "has_success" (at least one
        correct rollout, the SDPO teacher needs a successful peer) or "all".
    context: default privileged context; the recipe's `teacher.context` overrides it.
    needs_topk: the teacher ships the student's top-k support ids with the teacher's log-probs
        at those ids (logit-level distillation).
    needs_teacher_entropy: the teacher ships its full-vocabulary entropy per token (SRPO).
    norm_by_std: default advantage std normalisation (Table 5).
    entropy_coef: default entropy-bonus coefficient when the recipe does not set one.
    """

    name: str
    weight: WeightFn | None
    loss: str = "ppo"
    teacher_scores: TeacherScores = "all"
    score_groups: ScoreGroups = "mixed"
    context: Context = "solution_or_peer"
    needs_topk: bool = False
    needs_teacher_entropy: bool = False
    norm_by_std: bool = True
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"method name must be a non-empty string, got {self.name!r}")
        for field, value, allowed in (("teacher_scores", self.teacher_scores, ("none", "correct", "failed", "all")),
                                      ("score_groups", self.score_groups, ("mixed", "has_success", "all")),
                                      ("context", self.context, ("solution", "peer", "solution_or_peer"))):
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {field} must be one of {allowed}, got {value!r}")
        if self.weight is not None and not callable(self.weight):
            raise ValueError(f"method {self.name!r}: weight must be callable or None")
        if self.teacher_scores == "none" and (self.needs_topk or self.needs_teacher_entropy):
            raise ValueError(f"method {self.name!r} asks for teacher rows but scores no rollout")
        if not self.entropy_coef >= 0.0:
            raise ValueError(f"method {self.name!r}: entropy_coef must be >= 0, got {self.entropy_coef!r}")

    @property
    def needs_teacher(self) -> bool:
        """Whether any rollout is scored by the teacher."""
        return self.teacher_scores != "none"


_SPECS: dict[str, MethodSpec] = {}


@overload
def register_method(spec: MethodSpec) -> MethodSpec: ...
@overload
def register_method(spec: str, *, needs_teacher: bool = True) -> Callable[[WeightFn], WeightFn]: ...


def register_method(spec, *, needs_teacher: bool = True):
    """Register a method.

    `register_method(MethodSpec(...))` registers that spec and returns it.
    `@register_method("name")` on a weight function is the simple path: a spec with the PPO
    loss and the RLRT-family defaults (all rollouts of mixed groups, context
    solution_or_peer, std normalisation on); `needs_teacher=False` makes it teacher-free (no
    scores, std normalisation off, like GRPO). The function is returned unchanged.
    A name can be registered once (ValueError otherwise).
    """
    if isinstance(spec, MethodSpec):
        if spec.name in _SPECS:
            raise ValueError(f"method {spec.name!r} is already registered")
        _SPECS[spec.name] = spec
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"register_method takes a MethodSpec or a name, got {type(spec).__name__}")
    name = spec

    def deco(fn: WeightFn) -> WeightFn:
        register_method(MethodSpec(name=name, weight=fn, loss="ppo",
                                   teacher_scores="all" if needs_teacher else "none",
                                   norm_by_std=needs_teacher))
        return fn

    return deco


def unregister_method(name: str) -> MethodSpec:
    """Remove and return a registered spec (tests, plugin reloads)."""
    if name not in _SPECS:
        raise ValueError(_unknown(name))
    return _SPECS.pop(name)


def _unknown(name: object) -> str:
    return f"unknown method {name!r}; registered methods: {', '.join(sorted(_SPECS))}"


def get_method(name: str) -> MethodSpec:
    """The spec registered under `name`; ValueError listing the registered names otherwise."""
    spec = _SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(_unknown(name))
    return spec


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_SPECS)


class _WeightView(MutableMapping):
    """name -> weight function of every spec that has one: a live view of the spec registry
    (assigning registers a PPO spec with RLRT-family defaults, deleting unregisters)."""

    def __getitem__(self, name: str) -> WeightFn:
        spec = _SPECS.get(name)
        if spec is None or spec.weight is None:
            raise KeyError(name)
        return spec.weight

    def __setitem__(self, name: str, fn: WeightFn) -> None:
        register_method(name)(fn)

    def __delitem__(self, name: str) -> None:
        self[name]  # KeyError if absent
        del _SPECS[name]

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, s in _SPECS.items() if s.weight is not None])

    def __len__(self) -> int:
        return sum(1 for s in _SPECS.values() if s.weight is not None)


weight_functions: MutableMapping[str, WeightFn] = _WeightView()


def rollouts_to_score(spec: MethodSpec, rewards: Sequence[float]) -> list[int]:
    """Indices of the completions of one group the teacher must score for `spec`.

    Groups: "mixed" needs two different rewards, "has_success" a correct rollout, "all" any.
    Rollouts: "correct" keeps the correct ones, "failed" the others, "all" every one, "none" none.
    """
    rewards = [float(r) for r in rewards]
    if spec.teacher_scores == "none" or not rewards:
        return []
    if spec.score_groups == "mixed" and len(set(rewards)) < 2:
        return []
    if spec.score_groups == "has_success" and not any(is_correct(r) for r in rewards):
        return []
    if spec.teacher_scores == "correct":
        return [i for i, r in enumerate(rewards) if is_correct(r)]
    if spec.teacher_scores == "failed":
        return [i for i, r in enumerate(rewards) if not is_correct(r)]
    return list(range(len(rewards)))


# --------------------------------------------------------------------------------------
# Built-in weight functions (Table 4) and specs
# --------------------------------------------------------------------------------------


def grpo_weight(advantages: Tensor, rewards: Tensor, student: Tensor, teacher: Tensor | None):
    """GRPO (DAPO recipe): w_t = 1, nothing gated."""
    import torch

    return torch.ones_like(student), torch.zeros_like(rewards, dtype=torch.bool)


def rlsd_weight(advantages: Tensor, rewards: Tensor, student: Tensor, teacher: Tensor | None):
    """RLSD, eq. 2: w_t = exp(sign(A) * (log P_T - log P_S)) on all rollouts."""
    import torch

    assert teacher is not None
    delta = teacher - student  # Delta_t = -D_hat_t
    return torch.exp(torch.sign(advantages)[:, None] * delta), torch.ones_like(rewards, dtype=torch.bool)


def rlrt_weight(advantages: Tensor, rewards: Tensor, student: Tensor, teacher: Tensor | None):
    """RLRT, eqs. 6-7: w_t = exp(sign(A) * D_hat_t), applied only on correct rollouts."""
    import torch

    assert teacher is not None
    d_hat = student - teacher
    return torch.exp(torch.sign(advantages)[:, None] * d_hat), correct_mask(rewards)


def rlrt_all_weight(advantages: Tensor, rewards: Tensor, student: Tensor, teacher: Tensor | None):
    """RLRT without the reward gate (ablation, sec. 6.5): RLRT's weight on all rollouts."""
    import torch

    weight, _ = rlrt_weight(advantages, rewards, student, teacher)
    return weight, torch.ones_like(rewards, dtype=torch.bool)


# Entropy-bonus coefficient of the GRPO+EB baseline (sec. 6.4; Cheng et al. 2025 "Reasoning with
# exploration: an entropy perspective" use token-entropy regularisation of this order). The paper
# does not list it in Table 5, so recipes should set `algorithm.entropy_coef` explicitly.
GRPO_EB_ENTROPY_COEF = 1e-3

register_method(MethodSpec("grpo", grpo_weight, teacher_scores="none", norm_by_std=False))
register_method(MethodSpec("rlsd", rlsd_weight, teacher_scores="all"))
register_method(MethodSpec("rlrt", rlrt_weight, teacher_scores="correct"))
register_method(MethodSpec("rlrt_all", rlrt_all_weight, teacher_scores="all"))
register_method(MethodSpec("grpo_eb", grpo_weight, teacher_scores="none", norm_by_std=False,
                           entropy_coef=GRPO_EB_ENTROPY_COEF))
# SDPO (App. G.1): teacher = the model given a successful sibling; distillation on ALL rollouts of
# groups with a success (a successful rollout is taught by another success, never by itself).
register_method(MethodSpec("sdpo", None, loss="sdpo", teacher_scores="all", score_groups="has_success",
                           context="peer", needs_topk=True, norm_by_std=False))
# SRPO (arXiv 2604.02288 sec. 3.1): correct rollouts -> GRPO loss, failed rollouts with a teacher ->
# SDPO loss weighted by the teacher's entropy (only those are scored); no std normalisation (Table 5).
register_method(MethodSpec("srpo", grpo_weight, loss="srpo", teacher_scores="failed", score_groups="has_success",
                           context="peer", needs_topk=True, needs_teacher_entropy=True, norm_by_std=False))
