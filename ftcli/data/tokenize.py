"""Tokenize conversations with loss masks: assistant spans found by rendering the conversation turn by turn."""

from __future__ import annotations

from dataclasses import dataclass

from ftcli.data.templates import render
from ftcli.data.types import IGNORE_INDEX, Conversation, DataReport
from ftcli.errors import DataError
from ftcli.recipe.schema import DataConfig

TOKENIZE_CHUNK = 512


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    full_length: int                 # before truncation


def tokenize_examples(conversations: list[Conversation], data: DataConfig, tokenizer,
                      chat_template: str | None, report: DataReport) -> list[TokenizedExample]:
    """Every conversation tokenized, masked and truncated to data.max_length (report counts prefix mismatches)."""
    examples: list[TokenizedExample] = []
    for start in range(0, len(conversations), TOKENIZE_CHUNK):
        chunk_examples, mismatches = tokenize_chunk(conversations[start:start + TOKENIZE_CHUNK], data, tokenizer,
                                                    chat_template)
        examples += chunk_examples
        report.prefix_mismatches += sum(mismatches)
    return examples


def tokenize_chunk(chunk: list[Conversation], data: DataConfig, tokenizer,
                   chat_template: str | None) -> tuple[list[TokenizedExample], list[int]]:
    """(the chunk's examples truncated to data.max_length, the prefix mismatches met in each)."""
    if data.format != "text" and chat_template is None:
        raise DataError(f"format {data.format} needs a chat template", hint="see data.chat_template")
    if data.format == "text":
        examples, mismatches = _tokenize_texts(chunk, tokenizer), [0] * len(chunk)
    else:
        examples, mismatches = _tokenize_chats(chunk, data, tokenizer, chat_template)
    for example in examples:
        example.input_ids = example.input_ids[: data.max_length]
        example.labels = example.labels[: data.max_length]
    return examples, mismatches


def _tokenize_texts(chunk: list[Conversation], tokenizer) -> list[TokenizedExample]:
    encoded = tokenizer([c.text for c in chunk], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = []
    for ids in encoded:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)   # so the model learns where a document ends
        examples.append(TokenizedExample(ids, list(ids), len(ids)))
    return examples


def _turn_boundaries(conversation: Conversation, tokenizer, template: str) -> tuple[str, list[tuple[str, str]]]:
    """The full rendering and, per assistant turn, the rendering up to where its answer starts and ends."""
    messages = conversation.messages or []
    try:
        full = render(messages, tokenizer, template)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:index], tokenizer, template, add_generation_prompt=True)
            # The answer ends with its end-of-turn token (trained); whitespace the template adds after it is not.
            through = render(messages[: index + 1], tokenizer, template).rstrip()
            spans.append((before, through))
    except Exception as exc:  # the template's own raise_exception (e.g. "roles must alternate") or a Jinja error
        raise DataError(f"{conversation.origin}: the chat template cannot render this example: {exc}",
                        hint="fix the example or choose another template (data.chat_template)") from None
    for before, through in spans:
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{conversation.origin}: the chat template renders a conversation's beginning differently from the "
                "whole conversation, so the answer tokens cannot be located",
                hint="use a template that renders earlier turns the same way (data.chat_template), "
                     "or set data.train_on: all",
            )
    return full, spans


def _tokenize_chats(chunk: list[Conversation], data: DataConfig, tokenizer,
                    template: str) -> tuple[list[TokenizedExample], list[int]]:
    rendered = [_turn_boundaries(c, tokenizer, template) for c in chunk]
    texts = [full for full, _ in rendered]
    if data.train_on == "completion":
        texts += [text for _, spans in rendered for span in spans for text in span]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    fulls, boundary_ids = encoded[: len(chunk)], iter(encoded[len(chunk):])
    examples, mismatches = [], [0] * len(chunk)
    for number, (conversation, (full_text, spans), ids) in enumerate(zip(chunk, rendered, fulls)):
        ids = list(ids)
        if data.train_on == "all":
            examples.append(TokenizedExample(ids, list(ids), len(ids)))
            continue
        labels = [IGNORE_INDEX] * len(ids)
        offsets = None
        for before_text, through_text in spans:
            bounds = []
            for text in (before_text, through_text):
                prefix = next(boundary_ids)
                if list(ids[: len(prefix)]) == list(prefix):
                    bounds.append(len(prefix))
                    continue
                # Tokens merged across the boundary: locate it by character offset in the full tokenization.
                mismatches[number] += 1
                offsets = offsets or _offsets(full_text, tokenizer, conversation)
                bounds.append(sum(1 for start, _ in offsets if start < len(text)))
            start, end = bounds
            labels[start:end] = ids[start:end]
        examples.append(TokenizedExample(ids, labels, len(ids)))
    return examples, mismatches


def _offsets(text: str, tokenizer, conversation: Conversation) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{conversation.origin}: the tokenization of a turn boundary differs from the whole conversation's "
            "and this (slow) tokenizer gives no character offsets to locate it",
            hint="use the model's fast tokenizer (tokenizer.json), or set data.train_on: all",
        )
    return list(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def quantile(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {"min": float(ordered[0]), "p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99),
            "max": float(ordered[-1]), "mean": round(sum(ordered) / len(ordered), 2)}


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    answer_ids: list[list[int]]      # chosen then rejected, or an unpaired example's one answer
    full_length: int                 # prompt and the longest answer, before truncation


def tokenize_preference_chunk(chunk: list[Conversation], data: DataConfig, tokenizer,
                              chat_template: str) -> tuple[list[PreferenceExample], list[int]]:
    """Preference data as prompt and answer token ids through the chat template: the prompt rendered with the
    generation prompt, each answer as the rest of the whole conversation's rendering (its end-of-turn token
    included); the prompt keeps its last data.max_prompt_length tokens, the answers what data.max_length leaves."""
    texts, counts = [], []
    for conversation in chunk:
        answers = conversation.answers
        try:
            prompt = render(conversation.messages or [], tokenizer, chat_template, add_generation_prompt=True)
            sides = [render((conversation.messages or []) + answer, tokenizer, chat_template).rstrip()
                     for answer in answers]
        except Exception as exc:  # the template's own raise_exception or a Jinja error
            raise DataError(f"{conversation.origin}: the chat template cannot render this example: {exc}",
                            hint="fix the example or choose another template (data.chat_template)") from None
        for side in sides:
            if not side.startswith(prompt):
                raise DataError(f"{conversation.origin}: the chat template renders the prompt differently inside "
                                "the whole conversation, so the answer cannot be separated from it",
                                hint="use a template that renders earlier turns the same way (data.chat_template)")
        texts += [prompt, *sides]
        counts.append(len(sides))
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    prompt_limit = data.max_prompt_length or data.max_length // 2
    examples, mismatches = [], []
    for count in counts:
        prompt_ids = list(next(encoded))
        fulls = [list(next(encoded)) for _ in range(count)]
        shared = min(_common_prefix(prompt_ids, full) for full in fulls)
        mismatches.append(int(shared < len(prompt_ids)))   # a token merged across the boundary: cut before it
        prompt_ids, answers = prompt_ids[:shared], [full[shared:] for full in fulls]
        full_length = len(prompt_ids) + max(len(answer) for answer in answers)
        prompt_ids = prompt_ids[-prompt_limit:] if len(prompt_ids) > prompt_limit else prompt_ids
        room = max(0, data.max_length - len(prompt_ids))
        examples.append(PreferenceExample(prompt_ids, [answer[:room] for answer in answers], full_length))
    return examples, mismatches


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length
