"""An Ollama Modelfile whose TEMPLATE, SYSTEM and stop words are translated from the run's ChatML-style template."""

from __future__ import annotations

from dataclasses import dataclass

from ftcli.errors import UsageError

# Sentinel contents: rendered through the Jinja template, what surrounds them is the template's own text.
_SYSTEM, _USER, _ASSISTANT, _NEXT = "SYSTEM-0f3a", "USER-7c21", "ASSISTANT-9e54", "USER-AGAIN-41d8"


@dataclass(frozen=True)
class TurnFormat:
    """A template where every message renders as prefix + role + after_role + content + suffix."""

    prefix: str                  # "<|im_start|>"
    after_role: str              # "\n"
    suffix: str                  # "<|im_end|>\n"
    default_system: str | None   # the system prompt the template inserts when a conversation has none

    def render(self, messages: list[dict]) -> str:
        """What the Jinja template renders (with the generation prompt); used to prove the translation."""
        turns = "".join(f"{self.prefix}{m['role']}{self.after_role}{m['content']}{self.suffix}" for m in messages)
        return turns + f"{self.prefix}assistant{self.after_role}"


def _unsupported(reason: str) -> UsageError:
    return UsageError(
        f"can't translate the run's chat template into an Ollama template: {reason}",
        hint="export --format gguf and write the Modelfile TEMPLATE by hand (the GGUF carries the Jinja template)",
    )


def turn_format(chat_template: str | None, tokenizer) -> TurnFormat:
    """Recognise a ChatML-style template by rendering sentinel conversations; UsageError for anything else."""
    if chat_template is None:
        raise _unsupported("the run has no chat template (format: text)")

    def render(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation)

    try:
        full = render([{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER},
                       {"role": "assistant", "content": _ASSISTANT}], False)
        bare = render([{"role": "user", "content": _USER}], True)
    except Exception as exc:  # a template that rejects a system message, raises, etc.
        raise _unsupported(f"rendering a system/user/assistant conversation failed ({exc})") from None
    if not all(word in full for word in (_SYSTEM, _USER, _ASSISTANT)):
        raise _unsupported("it drops message contents")
    head = full[:full.index(_SYSTEM)]
    if "system" not in head:
        raise _unsupported("the role name does not appear before the message")
    prefix, after_role = head[:head.rindex("system")], head[head.rindex("system") + len("system"):]
    tail = full[full.index(_ASSISTANT) + len(_ASSISTANT):]
    fmt = TurnFormat(prefix=prefix, after_role=after_role, suffix=tail, default_system=None)
    expected = fmt.render([{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER},
                           {"role": "assistant", "content": _ASSISTANT}])
    if expected != full + f"{prefix}assistant{after_role}":
        raise _unsupported("its turns are not all written as <prefix>role<separator>content<suffix>")

    user_turn = fmt.render([{"role": "user", "content": _USER}])
    if not bare.endswith(user_turn):
        raise _unsupported("its generation prompt is not <prefix>assistant<separator>")
    inserted = bare[: -len(user_turn)]
    if inserted:
        start, end = f"{prefix}system{after_role}", tail
        if not (inserted.startswith(start) and inserted.endswith(end)):
            raise _unsupported("it inserts text other than a default system message")
        fmt = TurnFormat(prefix, after_role, tail, inserted[len(start): len(inserted) - len(end)])
    follow_up = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT},
                 {"role": "user", "content": _NEXT}]
    if render(follow_up, True) != fmt.render(_with_default_system(follow_up, fmt.default_system)):
        raise _unsupported("multi-turn conversations render differently from single turns")
    for text in (prefix, after_role, tail, fmt.default_system or ""):
        if "{{" in text or '"""' in text:
            raise _unsupported("it contains '{{' or '\"\"\"', which a Modelfile can't quote")
    return fmt


def _with_default_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def go_template(fmt: TurnFormat) -> str:
    """Ollama's Go template: every message as the Jinja template writes it, then the assistant's turn opens.
    Ollama puts the Modelfile SYSTEM in front as a system message when a request has none."""
    return (f"{{{{- range .Messages }}}}{fmt.prefix}{{{{ .Role }}}}{fmt.after_role}{{{{ .Content }}}}{fmt.suffix}"
            f"{{{{ end }}}}{fmt.prefix}assistant{fmt.after_role}")


def stop_words(fmt: TurnFormat, tokenizer) -> list[str]:
    """The EOS token and the turn markers: generation stops where the next turn would begin."""
    words = [tokenizer.eos_token, fmt.suffix.strip(), fmt.prefix.strip()]
    words = [w for i, w in enumerate(words) if w and w not in words[:i]]
    if any('"' in word or "\n" in word for word in words):
        raise _unsupported(f"a stop word can't be quoted in a Modelfile: {words}")
    return words


def modelfile(gguf_name: str, fmt: TurnFormat, tokenizer) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(fmt)}"""']
    if fmt.default_system is not None:
        lines.append(f'SYSTEM """{fmt.default_system}"""')
    lines += [f'PARAMETER stop "{word}"' for word in stop_words(fmt, tokenizer)]
    return "\n".join(lines) + "\n"
