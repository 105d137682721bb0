"""Student and teacher prompts.

The student sees the problem x; the teacher sees the problem plus privileged context c (a
reference solution, or a successful peer rollout of the same group). Both are rendered as one
user turn with the tokenizer's chat template and the generation prompt, so the same response
token ids y follow either prompt: P_S = pi(. | x, y<t), P_T = pi(. | x, c, y<t).

Prompts are returned as token ids and responses are never re-tokenised: scoring concatenates
`prompt_ids + response_ids`, so the ids scored under both views are exactly the ids sampled.
Templates are plain strings with the placeholders {problem} (and {context} for the teacher);
substitution is literal, so braces in problems or solutions (LaTeX `\\boxed{}`) are safe.
"""

from __future__ import annotations

import re
from typing import Any

DEFAULT_STUDENT_TEMPLATE = "{problem}"

DEFAULT_TEACHER_TEMPLATE = (
    "{problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "{context}\n\n"
    "After understanding the reference solution, solve the problem yourself, "
    "writing your own complete answer."
)


def render_template(template: str, **fields: str) -> str:
    """Substitute `{name}` placeholders literally (no str.format: values and templates may hold braces).

    Raises ValueError naming any placeholder of `fields` that the template lacks.
    """
    missing = [name for name in fields if "{" + name + "}" not in template]
    if missing:
        raise ValueError(
            f"prompt template lacks placeholder(s) {', '.join('{' + m + '}' for m in missing)}: {template!r}"
        )
    for name, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(f"prompt field {name!r} must be a string, got {type(value).__name__}")
    # one pass, so a problem that itself contains "{context}" is left as written
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in fields))
    return pattern.sub(lambda m: fields[m.group(0)[1:-1]], template)


def chat_ids(tokenizer: Any, user_text: str) -> list[int]:
    """One user turn through the tokenizer's chat template, generation prompt added -> token ids.

    Tokenizers without a chat template (base models) get the plain text with their special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        # Some tokenizer versions return a BatchEncoding / dict even with return_dict=False.
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(user_text, add_special_tokens=True)["input_ids"]]


def student_prompt_ids(tokenizer: Any, prompt: str, *, template: str | None = None) -> list[int]:
    """Token ids of the student prompt for a problem (chat template, generation prompt added)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("student prompt: the problem text is empty")
    return chat_ids(tokenizer, render_template(template or DEFAULT_STUDENT_TEMPLATE, problem=prompt))


def teacher_prompt_text(prompt: str, context: str, *, template: str | None = None) -> str:
    """The teacher's user message: `template` (default DEFAULT_TEACHER_TEMPLATE) filled with problem and context."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("teacher prompt: the problem text is empty")
    if not isinstance(context, str) or not context.strip():
        raise ValueError("teacher prompt: the privileged context (reference solution or peer rollout) is empty")
    return render_template(template or DEFAULT_TEACHER_TEMPLATE, problem=prompt, context=context)


def teacher_prompt_ids(tokenizer: Any, prompt: str, context: str, *, template: str | None = None) -> list[int]:
    """Token ids of the teacher prompt: the problem plus privileged context `context`, same chat framing
    and generation prompt as the student's, so the sampled response ids can follow it unchanged."""
    return chat_ids(tokenizer, teacher_prompt_text(prompt, context, template=template))
