"""Render a model's own chat template (Jinja) exactly as Hugging Face transformers would.

Models are trained on one prompt format and the GGUF carries it as `tokenizer.chat_template`; rendering
it with the same Jinja setup as `transformers.apply_chat_template` (sandboxed, `trim_blocks`,
`lstrip_blocks`, the `raise_exception` / `strftime_now` globals, a `tojson` that keeps non-ASCII and
HTML characters) gives the model the exact text it expects. Every failure becomes `ChatTemplateError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import jinja2
import jinja2.ext
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmos.errors import ChatTemplateError

if TYPE_CHECKING:  # the gguf reader is only needed at import time, not to load a model
    from llmos.gguf_file import GGUFFile

ROLES = ("system", "user", "assistant", "tool")

#: Used only when a GGUF carries no `tokenizer.chat_template` at all: plain ChatML, the format most
#: small instruct models (SmolLM, Qwen) use. A model trained on another format will answer poorly with
#: it, which is why a template the GGUF does carry is never replaced.
DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` and render its body unchanged.

    Some templates mark the assistant's text this way for transformers' training-time assistant masks;
    for inference the block is plain output, but without the tag such templates would not even compile.
    """

    tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateRaised(jinja2.TemplateError):
    """What the template's own `raise_exception(...)` throws, kept apart to word the error clearly."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON without Jinja's HTML escaping: a prompt is not a web page, and `<` must stay `<`."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled chat template plus the BOS/EOS token texts it may refer to."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        """Compile `source`; a syntax error is reported now, not at the first chat."""
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _environment()
        try:
            self._ast = env.parse(source)
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from e

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> ChatTemplate:
        """The GGUF's `tokenizer.chat_template`, or `DEFAULT_CHATML_TEMPLATE` only if it has none."""
        source = gguf.get("tokenizer.chat_template")
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"{gguf.path}: tokenizer.chat_template is not a string")
        tokens = gguf.get("tokenizer.ggml.tokens")
        return cls(
            source if source else DEFAULT_CHATML_TEMPLATE,
            bos_token=_token_text(tokens, gguf.get("tokenizer.ggml.bos_token_id")),
            eos_token=_token_text(tokens, gguf.get("tokenizer.ggml.eos_token_id")),
        )

    @property
    def has_tool_role(self) -> bool:
        """True if the template mentions the 'tool' role, i.e. it knows how to show tool results."""
        return any(node.value == "tool" for node in self._ast.find_all(nodes.Const))

    @property
    def supports_tools(self) -> bool:
        """True if the template reads the `tools` variable, i.e. it can describe tools to the model."""
        return "tools" in meta.find_undeclared_variables(self._ast)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
    ) -> str:
        """The prompt text for `messages`, ending with the assistant's turn header if asked.

        `enable_thinking` reaches templates with a thinking switch (Qwen3's: False opens the reply with
        an empty `<think>` block, the way the model was trained to answer directly); None leaves the
        template's default, and templates without the switch ignore it.
        """
        checked = _check_messages(messages)
        if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise ChatTemplateError("tools must be a list of JSON objects")
        try:
            extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
            return self._template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except _TemplateRaised as e:
            raise ChatTemplateError(f"the model's chat template rejected these messages: {e.message}") from e
        except Exception as e:  # any Jinja or Python error inside the template
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Shallow-copied messages after checking each has a known role and text content."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not messages:
        raise ChatTemplateError("messages is empty")
    checked: list[dict[str, Any]] = []
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {n} is a {type(message).__name__}, not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"message {n} has role {role!r}; roles are {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatTemplateError(f"message {n} content must be a string, not {type(content).__name__}")
        checked.append(dict(message))
    return checked


def _token_text(tokens: Any, token_id: Any) -> str:
    """A special token's text by id, or '' when the GGUF has no such token."""
    if not isinstance(tokens, list) or token_id is None:
        return ""
    i = int(token_id)
    return tokens[i] if 0 <= i < len(tokens) else ""
