"""Choose the chat template a run uses and render conversations (whole, or up to a turn) through it."""

from __future__ import annotations

from pathlib import Path

from ftcli.data.types import Conversation
from ftcli.errors import DataError, NotAvailableError, UsageError
from ftcli.recipe.schema import DataConfig

# ChatML without a default system prompt: what data.default_chat_template: chatml names.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


def resolve_chat_template(data: DataConfig, tokenizer) -> str | None:
    """The template to use: recipe inline/file > tokenizer's own > data.default_chat_template; UsageError otherwise
    (None only for format: text)."""
    if data.formats == {"text"}:
        return None
    if data.chat_template is not None:
        template, key = data.chat_template, "data.chat_template"
    elif data.chat_template_file is not None:
        template, key = _read_template_file(Path(data.chat_template_file)), "data.chat_template_file"
    elif _tokenizer_template(tokenizer):
        template, key = _tokenizer_template(tokenizer), "the tokenizer's chat template"
    elif data.default_chat_template is not None:
        template, key = NAMED_TEMPLATES[data.default_chat_template], "data.default_chat_template"
    else:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UsageError(
            f"the tokenizer of {name} has no chat template, which format "
            f"{'/'.join(sorted(data.formats - {'text'}))} needs",
            hint="set data.default_chat_template: chatml, or give data.chat_template / data.chat_template_file "
                 "(or use format: text for plain language-model training)",
        )
    _check_renders(template, tokenizer, key)
    return template


def _tokenizer_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default")
    return template or None


def _read_template_file(path: Path) -> str:
    if not path.is_file():
        raise NotAvailableError(f"chat template file not found: {path}", hint="check data.chat_template_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: the chat template is not valid UTF-8", hint="save it as UTF-8") from None
    if not text.strip():
        raise UsageError(f"{path}: the chat template file is empty", hint="check data.chat_template_file")
    return text


def _check_renders(template: str, tokenizer, key: str) -> None:
    try:
        text = render(_PROBE, tokenizer, template)
    except Exception as exc:  # jinja2 raises TemplateSyntaxError, UndefinedError, TemplateError, ...
        raise UsageError(f"{key} cannot render a conversation: {type(exc).__name__}: {exc}",
                         hint="fix the Jinja template (it receives messages and add_generation_prompt)") from None
    if "pong" not in text:
        raise UsageError(f"{key} does not render message contents (rendered {text[:120]!r})",
                         hint="the template must output each message['content']")


def render(messages: list[dict[str, str]], tokenizer, template: str, *, add_generation_prompt: bool = False) -> str:
    """The conversation as text through `template` (special tokens such as bos_token are available to it)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_for_generation(conversation: Conversation, tokenizer, chat_template: str | None) -> tuple[str, str]:
    """(prompt rendered up to the last assistant turn with the generation prompt, reference answer text)."""
    if conversation.messages is None:
        text = conversation.text or ""
        raise DataError(
            f"{conversation.origin or 'a text example'}: format text has no prompt/answer to split "
            f"({text[:40]!r}...)",
            hint="generation metrics need instruction, chat or prompt_completion data",
        )
    last = max((i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{conversation.origin or 'an example'}: no assistant turn to compare against")
    if chat_template is None:
        raise UsageError("a chat conversation needs a chat template", hint="pass the run's saved chat template")
    prompt = render(conversation.messages[:last], tokenizer, chat_template, add_generation_prompt=True)
    return prompt, conversation.messages[last]["content"]
