"""Text generation from a loaded run that honours every adapter kind, prefix and prompt tuning included."""

from __future__ import annotations

from dataclasses import dataclass

from ftcli.models.stop_tokens import stop_token_ids


@dataclass(frozen=True)
class DecodingSettings:
    max_new_tokens: int
    temperature: float = 0.0     # 0 is greedy
    top_p: float = 1.0
    seed: int = 0

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def render_user_prompt(tokenizer, chat_template: str | None, messages: list[dict[str, str]]) -> str:
    """The conversation through the run's template with the assistant prompt open; raw text without a template."""
    if chat_template is None:
        return "".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True)


def generate_texts(loaded, prompts: list[str], settings: DecodingSettings, *, batch_size: int = 1,
                   streamer=None) -> list[str]:
    """Completions of already rendered prompts, in order. `streamer` (a transformers streamer) needs batch_size 1.

    Prefix and prompt tuning put the adapter in the attention cache / input embeddings, which transformers'
    generate() drops (tests/test_generate.py shows ftcli's output differs), so those run the full PeftModel forward at
    every step, without a cache.
    """
    import torch

    if streamer is not None and batch_size != 1:
        raise ValueError("streaming needs batch_size 1")
    if settings.sampling:
        torch.manual_seed(settings.seed)
    tokenizer = loaded.tokenizer
    stops = stop_token_ids(tokenizer, loaded.model)
    step = _generate_uncached if loaded.virtual_tokens else _generate_cached
    outputs: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
            new_tokens = step(loaded, encoded, settings, stops, streamer)
            outputs += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens]
    return outputs


def _generate_cached(loaded, encoded: list[list[int]], settings: DecodingSettings, stops: list[int],
                     streamer) -> list[list[int]]:
    """transformers' generate() with a KV cache, prompts padded on the left."""
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt").to(loaded.device)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.sampling,
        temperature=settings.temperature if settings.sampling else None,
        top_p=settings.top_p if settings.sampling else None, top_k=0 if settings.sampling else None,
        eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
    )
    output = loaded.model.generate(**batch, generation_config=config, streamer=streamer)
    return [_until_stop(row.tolist(), stops) for row in output[:, batch["input_ids"].shape[1]:]]


def _generate_uncached(loaded, encoded: list[list[int]], settings: DecodingSettings, stops: list[int],
                       streamer) -> list[list[int]]:
    """Decode with the model's full forward at every step (no cache), prompts padded on the right.

    Right padding keeps every row's positions as in training (virtual tokens first, then the text); causal
    attention means the padding after a row's last token never affects it.
    """
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    device, pad = loaded.device, loaded.tokenizer.pad_token_id
    rows = len(encoded)
    lengths = torch.tensor([len(ids) for ids in encoded], device=device)
    prompt_lengths = lengths.clone()
    width_total = int(lengths.max()) + settings.max_new_tokens
    input_ids = torch.full((rows, width_total), pad, dtype=torch.long, device=device)
    attention = torch.zeros((rows, width_total), dtype=torch.long, device=device)
    for i, ids in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids, device=device)
        attention[i, :len(ids)] = 1
    warpers = LogitsProcessorList()
    if settings.sampling:
        warpers += [TemperatureLogitsWarper(settings.temperature), TopPLogitsWarper(settings.top_p)]
    stop_ids = torch.tensor(stops, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    every_row = torch.arange(rows, device=device)
    if streamer is not None:
        streamer.put(input_ids[0, :int(lengths[0])].cpu())  # the prompt: streamers skip it with skip_prompt
    for _ in range(settings.max_new_tokens):
        width = int(lengths.max())
        logits = loaded.model(input_ids=input_ids[:, :width], attention_mask=attention[:, :width]).logits
        logits = logits[:, -width:]  # prompt tuning prepends one position per virtual token
        scores = warpers(input_ids[:, :width], logits[every_row, lengths - 1].float())
        if settings.sampling:
            chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        active = ~finished
        input_ids[every_row[active], lengths[active]] = chosen[active]
        attention[every_row[active], lengths[active]] = 1
        if streamer is not None and bool(active[0]):
            streamer.put(chosen[:1].cpu())
        lengths = lengths + active.long()
        finished |= torch.isin(chosen, stop_ids)
        if bool(finished.all()):
            break
    if streamer is not None:
        streamer.end()
    return [_until_stop(input_ids[i, int(prompt_lengths[i]):int(lengths[i])].tolist(), stops) for i in range(rows)]


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first stop token (generate() pads finished rows; decoding must not see those)."""
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens
