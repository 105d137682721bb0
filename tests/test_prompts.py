"""Student/teacher prompts: chat framing, templates, and exact token alignment of the scored response."""

from __future__ import annotations

import copy

import pytest
import torch

from rlrt_core.engines import SamplingParams, TorchEngine
from rlrt_core.models import load_tokenizer
from rlrt_core.prompts import (
    DEFAULT_TEACHER_TEMPLATE,
    render_template,
    student_prompt_ids,
    teacher_prompt_ids,
    teacher_prompt_text,
)
from rlrt_core.scoring import score_views

PROBLEM = r"What is 3 + 4? Put the final answer in \boxed{}."
SOLUTION = r"3 + 4 = 7, so the answer is \boxed{7}."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def engine():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; avoids OpenMP spinning on a loaded 2-core machine
    yield TorchEngine("tiny", max_model_len=512)
    torch.set_num_threads(n)


def test_student_prompt_is_the_chat_template(tok):
    ids = student_prompt_ids(tok, PROBLEM)
    ref = tok.apply_chat_template([{"role": "user", "content": PROBLEM}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert ids == list(ref)
    text = tok.decode(ids)
    assert PROBLEM in text and text.endswith("<|im_start|>assistant\n")


def test_teacher_prompt_holds_problem_and_context(tok):
    s_ids = student_prompt_ids(tok, PROBLEM)
    t_ids = teacher_prompt_ids(tok, PROBLEM, SOLUTION)
    text = tok.decode(t_ids)
    assert PROBLEM in text and SOLUTION in text and "reference solution" in text
    assert "solve the problem yourself" in text
    assert len(t_ids) > len(s_ids)
    # same chat framing around the user turn, so the response follows the same generation prompt
    suffix = tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert s_ids[-len(suffix):] == suffix and t_ids[-len(suffix):] == suffix
    assert s_ids[:3] == t_ids[:3]


def test_custom_templates(tok):
    t_ids = teacher_prompt_ids(tok, PROBLEM, SOLUTION, template="Hint: {context}\nTask: {problem}")
    assert tok.decode(t_ids).count("Hint: " + SOLUTION + "\nTask: " + PROBLEM) == 1
    s_ids = student_prompt_ids(tok, PROBLEM, template="Solve carefully.\n{problem}")
    assert "Solve carefully.\n" + PROBLEM in tok.decode(s_ids)


def test_substitution_is_literal():
    # braces in values survive, and a problem that mentions "{context}" is not substituted into
    out = render_template(DEFAULT_TEACHER_TEMPLATE, problem="find {x} in {context}", context=r"\frac{1}{2}")
    assert out.startswith("find {x} in {context}\n\n") and r"\frac{1}{2}" in out
    assert teacher_prompt_text("p", "c", template="{problem}|{context}") == "p|c"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda tok: teacher_prompt_ids(tok, PROBLEM, SOLUTION, template="{problem} only"), r"lacks placeholder\(s\) \{context\}"),
        (lambda tok: student_prompt_ids(tok, PROBLEM, template="no placeholder"), r"lacks placeholder\(s\) \{problem\}"),
        (lambda tok: student_prompt_ids(tok, "  "), "problem text is empty"),
        (lambda tok: teacher_prompt_ids(tok, PROBLEM, ""), "privileged context .* is empty"),
    ],
)
def test_bad_prompts(tok, call, match):
    with pytest.raises(ValueError, match=match):
        call(tok)


def test_tokenizer_without_chat_template_uses_plain_text(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    ids = student_prompt_ids(plain, PROBLEM)
    assert ids == plain(PROBLEM, add_special_tokens=True)["input_ids"]


def test_scored_ids_are_the_sampled_ids(tok, engine):
    """Sample from the student prompt, score both views: the scorer sees exactly the sampled ids.

    Under the student view the scorer must reproduce the engine's own behaviour log-probs (which
    it can only do position by position if the ids line up); under the teacher view it must equal
    a plain forward pass over teacher_ids + sampled ids, read at the response positions.
    """
    s_ids = student_prompt_ids(tok, PROBLEM)
    t_ids = teacher_prompt_ids(tok, PROBLEM, SOLUTION)
    res = engine.generate([s_ids], SamplingParams(n=3, max_new_tokens=12, seed=0))
    ys = [c.token_ids for c in res[0].completions]
    student, teacher = score_views(engine.model, [s_ids] * 3, [t_ids] * 3, ys)
    for i, c in enumerate(res[0].completions):
        n = len(c.token_ids)
        assert student.mask[i].sum() == n
        torch.testing.assert_close(student.logprobs[i, :n], torch.tensor(c.logprobs), atol=2e-5, rtol=0)
        with torch.no_grad():
            logits = engine.model(torch.tensor([t_ids + c.token_ids])).logits[0].float()
        ref = torch.log_softmax(logits[len(t_ids) - 1 : len(t_ids) + n - 1], -1)
        ref = ref.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(teacher.logprobs[i, :n], ref, atol=1e-5, rtol=0)
        # and the views differ: the privileged context changes the model's belief
        assert not torch.allclose(teacher.logprobs[i, :n], student.logprobs[i, :n])
