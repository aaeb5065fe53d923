"""`ftcli generate` and `ftcli chat`: talk to a run through its saved chat template."""

from __future__ import annotations

import sys

from ftcli.errors import UsageError

CHAT_COMMANDS = {"/exit": "quit (Ctrl-D too)", "/reset": "forget the conversation so far"}


def _load(run, merged: bool, action: str):
    from ftcli.models.run_model import load_run_model

    return load_run_model(run, merged=merged, action=action)


def _streamer(loaded, console):
    """A transformers TextStreamer writing to `console` as tokens arrive (None when not on a terminal)."""
    if console is None or not console.is_terminal:
        return None
    from transformers import TextStreamer

    class ConsoleStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            console.print(text, end="\n" if stream_end else "", markup=False, highlight=False, soft_wrap=True)

    return ConsoleStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_generate(run, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 merged: bool, stream=None) -> list[dict]:
    """Each prompt as one user turn through the run's template; outputs printed to `stream` (a rich Console)
    as they come, token by token on a terminal. Returns [{"prompt", "output", "rendered"}], rendered being the
    exact text the model saw."""
    from ftcli.inference.decoding import DecodingSettings, generate_texts, render_user_prompt

    loaded = _load(run, merged, "generate from")
    settings = DecodingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    streamer = _streamer(loaded, stream)
    results = []
    for index, prompt in enumerate(prompts):
        if stream is not None and len(prompts) > 1:
            stream.print(f"[{index + 1}/{len(prompts)}] {prompt}", style="dim", markup=False, highlight=False)
        rendered = render_user_prompt(loaded.tokenizer, loaded.chat_template, [{"role": "user", "content": prompt}])
        # Seeded per prompt, so an output does not depend on which prompts came before it.
        per_prompt = DecodingSettings(**{**settings.__dict__, "seed": seed + index})
        output = generate_texts(loaded, [rendered], per_prompt, streamer=streamer)[0]
        if stream is not None and streamer is None:
            stream.print(output, markup=False, highlight=False)
        results.append({"prompt": prompt, "output": output, "rendered": rendered})
    return results


def run_chat(run, *, max_new_tokens: int, temperature: float, top_p: float, seed: int, merged: bool, console) -> None:
    """A multi-turn chat on stdin/stdout: history kept, /reset clears it, /exit or end of input quits.

    On a terminal it shows prompts and streams replies; from a pipe it prints one reply per input line."""
    from ftcli.inference.decoding import DecodingSettings, generate_texts, render_user_prompt

    loaded = _load(run, merged, "chat with")
    if loaded.chat_template is None:
        raise UsageError(f"run {run.name!r} was trained on plain text (format text) and has no chat template",
                         hint=f"use: ftcli generate {run.name} --prompt TEXT")
    interactive = sys.stdin.isatty()
    streamer = _streamer(loaded, console)
    if interactive:
        commands = ", ".join(f"{name} {what}" for name, what in CHAT_COMMANDS.items())
        console.print(f"chat with run {run.name} ({commands})", style="dim", markup=False, highlight=False)
    history: list[dict[str, str]] = []
    turn = 0
    while True:
        line = _read_line("you> " if interactive else "")
        if line is None or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            console.print("(conversation cleared)", style="dim", markup=False, highlight=False)
            continue
        history.append({"role": "user", "content": text})
        rendered = render_user_prompt(loaded.tokenizer, loaded.chat_template, history)
        settings = DecodingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed + turn)
        if streamer is not None:
            console.print("bot> ", end="", style="bold", markup=False, highlight=False)
        reply = generate_texts(loaded, [rendered], settings, streamer=streamer)[0]
        if streamer is None:
            console.print(reply, markup=False, highlight=False)
        history.append({"role": "assistant", "content": reply})
        turn += 1


def _read_line(prompt: str) -> str | None:
    """One line from stdin, None at end of input (Ctrl-D)."""
    try:
        return input(prompt) if prompt else sys.stdin.readline() or None
    except EOFError:
        return None
