"""data.streaming through the CLI: training from records read as it goes, a bad record mid-way, and the resume."""

from __future__ import annotations

import json

import pytest
from helpers import memorisable_chat, write_jsonl

from ftcli.data.streaming import SHUFFLE_BUFFER

BAD_LINE = SHUFFLE_BUFFER + 60   # read once the shuffle buffer is full and training has taken some steps


@pytest.mark.slow   # a thousand tiny steps
def test_streaming_stops_at_a_bad_record_with_its_line_and_resumes_once_fixed(cli_inproc, tiny_recipe, runs_dir,
                                                                           tmp_path):
    records = memorisable_chat(BAD_LINE + 200)
    path = write_jsonl(tmp_path / "stream.jsonl", records)
    lines = path.read_text(encoding="utf-8").splitlines()
    good_line = lines[BAD_LINE - 1]
    lines[BAD_LINE - 1] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = ["--set", f"data.train={path}", "--set", "data.streaming=true", "--set", "training.max_steps=1000",
               "--set", "training.batch_size=1", "--set", "training.save_steps=100"]

    failed = cli_inproc("train", tiny_recipe, *options)
    assert failed.exit_code == 3, failed
    assert f"stream.jsonl:{BAD_LINE}: messages has no assistant turn" in failed.stderr
    assert "checkpoint at step" in failed.stderr and "--resume" in failed.stderr
    state = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert state["status"] == "failed" and state["data"]["streaming"] is True
    reached = state["step"]
    assert 0 < reached < 1000
    assert (runs_dir / "tiny" / "checkpoints" / f"checkpoint-{reached}").is_dir()

    lines[BAD_LINE - 1] = good_line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    resumed = cli_inproc("train", tiny_recipe, *options, "--resume")
    assert resumed.exit_code == 0, resumed
    assert f"resuming from checkpoint-{reached}" in resumed.stderr
    state = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert state["status"] == "completed"


def test_streaming_dry_run_validates_the_first_records_and_reports_no_counts(cli_inproc, tiny_recipe, tmp_path):
    path = write_jsonl(tmp_path / "stream.jsonl", memorisable_chat(10))
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--json", "--set", f"data.train={path}",
                        "--set", "data.streaming=true")
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    assert report["data"]["streaming"] is True and len(report["samples"]) == 3
