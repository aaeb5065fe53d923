"""Turn raw records of each record format (text, instruction, chat, prompt_completion, prompt, preference,
unpaired_preference) into validated Conversations."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ftcli.data.sources import MAX_LISTED_PROBLEMS, RawRecord, raise_problems
from ftcli.data.types import Conversation
from ftcli.recipe.schema import DEFAULT_COLUMNS, DataConfig

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
OPTIONAL_COLUMNS = {"input", "prompt"}   # preference records may leave the prompt implicit in both answers


class RecordProblem(ValueError):
    """A record that cannot be used; the message says why (the caller adds where)."""


def column_names(data: DataConfig) -> dict[str, str]:
    """This format's column names mapped to the names in the data (data.columns, ShareGPT's `conversations`)."""
    names = {name: name for name in DEFAULT_COLUMNS[data.format]}
    if data.sharegpt:
        names["messages"] = "conversations"
    names.update(data.columns)
    return names


class RecordConverter:
    """Turns the raw records of one source into Conversations; RecordProblem says what is wrong with one."""

    def __init__(self, data: DataConfig):
        self.data = data
        self.convert = _CONVERTERS[data.format]
        self.columns = column_names(data)
        self.hint = _hint(data)

    def __call__(self, record: RawRecord) -> Conversation:
        if record.problem is not None:
            raise RecordProblem(record.problem)
        return self.convert(_pick_columns(record.fields, self.columns), self.data, record.origin)


def to_conversations(records, data: DataConfig) -> list[Conversation]:
    """Validate every record; DataError listing the first problems, each with its file and line."""
    converter = RecordConverter(data)
    conversations, problems = [], []
    for record in records:
        try:
            conversations.append(converter(record))
        except RecordProblem as exc:
            problems.append(f"{record.origin}: {exc}")
            if len(problems) >= MAX_LISTED_PROBLEMS:
                break
    raise_problems(problems, hint=converter.hint)
    return conversations


def _hint(data: DataConfig) -> str:
    names = ", ".join(DEFAULT_COLUMNS[data.format])
    return (f"data.format is {data.format} (columns {names}); map other column names with data.columns, "
            f"e.g. columns: {{{DEFAULT_COLUMNS[data.format][0]}: your_column}}")


def _pick_columns(fields: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    picked = {}
    for name, source in columns.items():
        if source not in fields:
            if name in OPTIONAL_COLUMNS:
                continue
            present = ", ".join(sorted(map(str, fields))) or "none"
            mapped = f" (data.columns maps {name} to {source})" if source != name else ""
            raise RecordProblem(f"missing column {source!r}{mapped}; columns present: {present}")
        picked[name] = fields[source]
    return picked


def _text(value: Any, name: str, *, optional: bool = False) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return ""
        raise RecordProblem(f"{name} is {'null' if value is None else 'empty'}")
    if not isinstance(value, str):
        raise RecordProblem(f"{name} must be a string, got {type(value).__name__}")
    return value


def _with_system(messages: list[dict[str, str]], data: DataConfig) -> list[dict[str, str]]:
    if data.system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": data.system_prompt}, *messages]
    return messages


def _text_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    return Conversation(text=_text(fields["text"], "text"), origin=origin)


def _instruction_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    instruction = _text(fields["instruction"], "instruction")
    extra = _text(fields.get("input"), "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(fields["output"], "output")}]
    return Conversation(messages=_with_system(messages, data), origin=origin)


def _prompt_completion_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    prompt, completion = fields["prompt"], fields["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt-completion: two lists of messages.
        messages = _messages(_as_list(prompt, "prompt"), sharegpt=False, name="prompt") + _messages(
            _as_list(completion, "completion"), sharegpt=False, name="completion")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordProblem("completion has no assistant message (nothing to train on)")
        return Conversation(messages=_with_system(messages, data), origin=origin)
    messages = [{"role": "user", "content": _text(prompt, "prompt")},
                {"role": "assistant", "content": _text(completion, "completion")}]
    return Conversation(messages=_with_system(messages, data), origin=origin)


def _prompt_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    """A prompt (text or messages) and the reference answer rewards check: the conversation ends with the reference
    as the assistant's turn, so that eval and SFT read it as they read prompt_completion."""
    if "prompt" not in fields:
        raise RecordProblem("missing the prompt column (map it with data.columns)")
    if fields["prompt"] is None:
        raise RecordProblem("prompt is null")
    reference = fields["reference"]
    if isinstance(reference, int | float) and not isinstance(reference, bool):
        reference = str(reference)   # a numeric answer, e.g. {"prompt": "Add 2 and 3.", "reference": 5}
    messages = _prompt(fields["prompt"]) + [{"role": "assistant", "content": _text(reference, "reference")}]
    return Conversation(messages=_with_system(messages, data), origin=origin)


def _chat_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    name = column_names(data)["messages"]
    messages = _messages(_as_list(fields["messages"], name), sharegpt=data.sharegpt, name=name)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordProblem(f"{name} has no assistant turn (nothing to train on)")
    return Conversation(messages=messages, origin=origin)


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, str):  # CSV cells and some exports hold the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordProblem(f"{name} must be a list of messages, got a string that is not JSON") from None
    if value is None:
        raise RecordProblem(f"{name} is null")
    if not isinstance(value, list):
        raise RecordProblem(f"{name} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RecordProblem(f"{name} is empty")
    return value


def _messages(turns: list, *, sharegpt: bool, name: str) -> list[dict[str, str]]:
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    allowed = tuple(SHAREGPT_ROLES) if sharegpt else CHAT_ROLES
    messages = []
    for index, turn in enumerate(turns):
        where = f"{name}[{index}]"
        if not isinstance(turn, dict):
            raise RecordProblem(f"{where} must be an object with {role_key!r} and {content_key!r}")
        if role_key not in turn:
            keys = ", ".join(sorted(map(str, turn))) or "none"
            style = "ShareGPT turns use from/value" if sharegpt else "set data.sharegpt: true for from/value turns"
            raise RecordProblem(f"{where} has no {role_key!r} (keys: {keys}); {style}")
        role = turn[role_key]
        if role not in allowed:
            raise RecordProblem(f"{where} has role {role!r}; allowed: {', '.join(allowed)}")
        content = _text(turn.get(content_key), f"{where}.{content_key}")
        messages.append({"role": SHAREGPT_ROLES[role] if sharegpt else role, "content": content})
    return messages


def _answer(value: Any, name: str) -> list[dict[str, str]]:
    """One side of a preference pair: a string (one assistant turn) or a list of messages."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [{"role": "assistant", "content": _text(value, name)}]
    return _messages(_as_list(value, name), sharegpt=False, name=name)


def _prompt(value: Any) -> list[dict[str, str]]:
    """A preference record's prompt: a string (one user turn) or a list of messages."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [{"role": "user", "content": _text(value, "prompt")}]
    return _messages(_as_list(value, "prompt"), sharegpt=False, name="prompt")


def _check_answer(name: str, answer: list[dict[str, str]]) -> None:
    if not answer:
        raise RecordProblem(f"{name} adds nothing after the prompt")
    if answer[0]["role"] != "assistant":
        raise RecordProblem(f"{name} must start with an assistant turn after the prompt, not {answer[0]['role']}")


def _preference_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    chosen, rejected = _answer(fields["chosen"], "chosen"), _answer(fields["rejected"], "rejected")
    if "prompt" in fields and fields["prompt"] is not None:
        messages = _prompt(fields["prompt"])
    else:   # TRL's implicit prompt: both sides are whole conversations sharing their first turns
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        messages, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not messages:
            raise RecordProblem("no prompt column, and chosen and rejected share no first turn to be the prompt")
    _check_answer("chosen", chosen)
    _check_answer("rejected", rejected)
    if chosen == rejected:
        raise RecordProblem("chosen and rejected are identical (nothing to prefer)")
    return Conversation(messages=_with_system(messages, data), chosen=chosen, rejected=rejected, origin=origin)


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):   # CSV cells are text
        return value.strip().lower() == "true"
    shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
    raise RecordProblem(f"label must be true (desirable) or false (undesirable), got {shown}")


def _unpaired_record(fields: dict[str, Any], data: DataConfig, origin: str) -> Conversation:
    if "prompt" not in fields:
        raise RecordProblem("missing the prompt column: an unpaired answer needs its prompt (map it with "
                            "data.columns)")
    if fields["prompt"] is None:
        raise RecordProblem("prompt is null")
    messages, completion = _prompt(fields["prompt"]), _answer(fields["completion"], "completion")
    _check_answer("completion", completion)
    desirable = _label(fields["label"])
    return Conversation(messages=_with_system(messages, data), chosen=completion if desirable else None,
                        rejected=None if desirable else completion, origin=origin)


_CONVERTERS: dict[str, Callable[[dict[str, Any], DataConfig, str], Conversation]] = {
    "text": _text_record,
    "instruction": _instruction_record,
    "chat": _chat_record,
    "prompt_completion": _prompt_completion_record,
    "prompt": _prompt_record,
    "preference": _preference_record,
    "unpaired_preference": _unpaired_record,
}
