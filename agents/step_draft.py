"""What a step says while it is still being written, or after a limit cut it short: the answer so far, or
the tool a call names and its arguments so far.

The daemon streams an answer to the run's owner as the model writes it, and names a call as soon as its
tool is written, so the app is not left silent for the seconds a step takes; a call cut short by a limit
is reported with its tool and the arguments it had reached, not as a bare failure. The step's text is in
the run's tool format (`agents.tool_format`), whose `cut_answer` and `cut_call` read a text cut short
anywhere; a text that could still become either (`{"` in JSON steps) is neither yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.tool_format import ToolCallFormat

ARGUMENTS_KEY = '"arguments": '  # both formats write a call's arguments under this key, compactly


@dataclass(frozen=True)
class StepDraft:
    answer: str | None = None  # the answer so far, if the step answers
    tool: str | None = None  # the tool a call names, once its name is written whole
    arguments_text: str | None = None  # the call's arguments as written so far: JSON, maybe cut short


def read_draft(fmt: ToolCallFormat, text: str) -> StepDraft:
    """The step written so far, read in `fmt`."""
    answer = fmt.cut_answer(text)
    if answer is not None:
        return StepDraft(answer=answer)
    return StepDraft(tool=fmt.cut_call(text), arguments_text=partial_arguments(text))


def partial_arguments(text: str) -> str | None:
    """A call's arguments as written so far (the JSON object's text, without what closes the call around
    it when the call is whole); None before the arguments start."""
    start = text.find(ARGUMENTS_KEY)
    if start < 0:
        return None
    body = text[start + len(ARGUMENTS_KEY) :].rstrip()
    depth, in_string, escaped = 0, False, False
    for i, c in enumerate(body):  # the object ends where its braces balance: what follows is markup
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return body[: i + 1]
    return body
