"""Progress of the long steps (data preparation, eval, merge, GGUF) on stderr: plain lines every few seconds when
stderr is not a terminal, a rich bar when it is, nothing on stdout (where --json prints its one document)."""

from __future__ import annotations

import io
import json
import re

import pytest
from helpers import TINY_RECIPE, memorisable_chat, quick_lora_run, run_inproc, write_jsonl, write_recipe

from ftcli.progress import INTERVAL_ENV, progress


def plain_console():
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False, width=200)


class Clock:
    """time.monotonic for ftcli.progress, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import ftcli.progress

    fake = Clock()
    monkeypatch.setattr(ftcli.progress.time, "monotonic", fake)
    return fake


def test_plain_lines_come_every_interval_with_counts_rate_and_time_left(clock, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "10")
    console = plain_console()
    with progress(console, "tokenizing", total=100, unit="examples") as bar:
        for _ in range(25):          # 4 examples a second for 25 s
            clock.now += 1
            bar.advance(4)
    lines = console.file.getvalue().splitlines()
    assert lines == [
        "tokenizing: 40/100 examples (40%), 4.0 examples/s, 10 s, about 15 s left",
        "tokenizing: 80/100 examples (80%), 4.0 examples/s, 20 s, about 5 s left",
        "tokenizing: 100/100 examples, 4.0 examples/s, done in 25 s",
    ]


def test_open_ended_steps_count_and_short_steps_print_nothing(clock, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "5")
    console = plain_console()
    with progress(console, "reading train data", unit="examples") as bar:
        clock.now += 6
        bar.advance(3000)
        bar.describe("the second file")          # no line: the last one was printed just now
    with progress(console, "quick", total=3) as bar:   # under the interval: silent
        bar.advance(3)
    with progress(None, "no console", total=3) as bar:  # library use: no console, no output
        bar.advance(3)
    assert console.file.getvalue().splitlines() == [
        "reading train data: 3,000 examples, 500 examples/s, 6 s",
        "reading train data: 3,000 examples, 500 examples/s, done in 6 s",
    ]


def test_steps_without_estimates_and_failures(clock, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    console = plain_console()
    with progress(console, "merging", total=3, unit="steps", estimate=False) as bar:
        bar.describe("loading")
        clock.now += 70
        bar.advance()
    with pytest.raises(RuntimeError), progress(console, "failing", total=2) as bar:
        bar.advance()
        raise RuntimeError("stopped")
    assert console.file.getvalue().splitlines() == [
        "merging: 0/3 steps (0%), 0 s (loading)",
        "merging: 1/3 steps (33%), 1 min 10 s (loading)",
        "merging: 1/3 steps, done in 1 min 10 s",
        "failing: 1/2 items (50%), 0 s",   # no closing line for a step that failed
    ]


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_interval_falls_back_to_the_default(value, monkeypatch):
    from ftcli.progress import DEFAULT_INTERVAL_S, interval_s

    monkeypatch.setenv(INTERVAL_ENV, value)
    assert interval_s() == DEFAULT_INTERVAL_S


def test_a_terminal_gets_a_rich_bar_that_nested_steps_share():
    from rich.console import Console

    import ftcli.progress

    console = Console(file=io.StringIO(), force_terminal=True, width=150, color_system=None)
    with progress(console, "scoring the loss (run)", total=4, unit="examples") as outer:
        with progress(console, "generating answers (run)", unit="examples") as inner:
            inner.advance(2)
            assert len(ftcli.progress._LIVE) == 1     # one live display, two tasks
        outer.advance(4)
    assert ftcli.progress._LIVE == {}
    text = console.file.getvalue()
    assert "scoring the loss (run)" in text and "generating answers (run)" in text
    assert "4/4" in text and "━" in text       # rich's bar, full


def test_data_prepared_by_several_processes_counts_every_record(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from ftcli.data import sources
    from ftcli.data.pipeline import prepare_data
    from ftcli.recipe.loader import load_recipe

    monkeypatch.setattr(sources, "MIN_PIECE_BYTES", 4096)   # several pieces from a small file
    monkeypatch.setenv(INTERVAL_ENV, "0")
    monkeypatch.setenv("FTCLI_CACHE_DIR", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "train.jsonl", memorisable_chat(1200))
    recipe_file = write_recipe(tmp_path / "r.yaml", TINY_RECIPE.format(model=tiny_model_dir, data=data))
    recipe = load_recipe(recipe_file, ["data.num_proc=2"]).recipe
    console = plain_console()
    prepared = prepare_data(recipe, AutoTokenizer.from_pretrained(tiny_model_dir), console=console)
    assert prepared.train_report.processes == 2
    lines = console.file.getvalue().splitlines()
    counts = [int(re.match(r"preparing train data \(read, validate, tokenize\): ([\d,]+) examples", line)
                  .group(1).replace(",", "")) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 1200 and len(set(counts)) > 1, lines
    assert "done in" in lines[-1]


# ---------------------------------------------------------------------------------------------- the commands


def only_json(stdout: str) -> dict:
    """stdout holds one JSON document and nothing else."""
    document = json.loads(stdout)
    assert stdout.lstrip().startswith("{") and stdout.rstrip().endswith("}")
    return document


def test_train_dry_run_shows_the_data_preparation_on_stderr(tmp_path, tiny_model_dir, monkeypatch):
    # Records of their own, so that the data cache has not seen them and the data is prepared for real.
    records = memorisable_chat() + [{"messages": [{"role": "user", "content": f"Say {tmp_path.name}"},
                                                  {"role": "assistant", "content": tmp_path.name}]}]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE.format(model=tiny_model_dir, data=data))
    result = run_inproc("train", recipe, "--dry-run", "--json", env={INTERVAL_ENV: "0"})
    assert result.exit_code == 0, result
    assert only_json(result.stdout)["data"]["train"]["examples"] == 17
    lines = result.stderr.splitlines()
    label = "preparing train data (read, validate, tokenize)"
    assert f"{label}: 17 examples" in "\n".join(lines)
    assert any(re.fullmatch(rf"{re.escape(label)}: 17 examples, [\d,.]+ examples/s, done in \d+ s", line)
               for line in lines), result.stderr
    assert "preparing" not in result.stdout


def test_eval_shows_loss_and_generation_progress_with_time_left(tmp_path_factory, tiny_model_dir):
    runs, name = quick_lora_run(tmp_path_factory, tiny_model_dir, "progress", r=4, lr=1e-3)
    result = run_inproc("eval", name, "--runs-dir", runs, "--compare-base", "--batch-size", "4", "--json",
                        env={INTERVAL_ENV: "0"})
    assert result.exit_code == 0, result
    document = only_json(result.stdout)
    assert document["data"]["examples"] == 16 and document["base_metrics"] is not None
    err = result.stderr
    for model in ("run", "base"):
        # four batches of four: a line after each, with the share done and the time left
        for done in (4, 8, 12):
            assert re.search(rf"scoring the loss \({model}\): {done}/16 examples \({done * 100 // 16}%\), "
                             r"[\d,.]+ examples/s, \d+ s, about \d+ (s|min \d+ s) left", err), (model, done, err)
            assert re.search(rf"generating answers \({model}\): {done}/16 examples \(\d+%\), .* left", err), \
                (model, done, err)
        assert re.search(rf"generating answers \({model}\): 16/16 examples, .*done in \d+ s", err)
    assert "tokenizing eval data: 16/16 examples" in err and "reading eval data (read, validate): 16" in err
    assert "scoring the loss" not in result.stdout and "generating answers" not in result.stdout
