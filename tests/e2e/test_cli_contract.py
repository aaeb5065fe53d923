"""The CLI contract scripts rely on, seen from outside through the real program: light commands stay light, --json is
one document, no prompts, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "gguf", "accelerate")
RECIPE = """\
model:
  path: org/never-loaded
method:
  kind: lora
  target_modules: [q_proj, v_proj]
data:
  train: train.jsonl
training:
  lr: 1e-4
"""

# Runs the ftcli program in-process, then reports which heavy modules that pulled in.
IMPORT_PROBE = """
import json, sys
from ftcli.cli.entry import main
report_path = sys.argv[1]
sys.argv = ["ftcli", *sys.argv[2:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = [m for m in {heavy!r} if m in sys.modules]
with open(report_path, "w") as report:
    json.dump({{"exit_code": code, "heavy": heavy}}, report)
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def bad_recipe(tmp_path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE.replace("lr: 1e-4", "lr: -1"))
    return path


def probe(tmp_path: Path, *args, modules: tuple[str, ...] = HEAVY) -> dict:
    report = tmp_path / "probe.json"
    code = IMPORT_PROBE.format(heavy=modules)
    subprocess.run([sys.executable, "-c", code, str(report), *map(str, args)], capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL, check=False)
    return json.loads(report.read_text())


@pytest.mark.parametrize("args", [
    ["--help"], ["schema"], ["validate", "{recipe}"], ["validate", "{recipe}", "--json"], ["validate", "{bad}"],
    ["recipe", "show", "{recipe}", "--explain"], ["train", "--help"], ["runs", "--help"],
    ["train", "{recipe}", "--name", "../escape"],
])
def test_light_commands_import_nothing_heavy(args, tmp_path, recipe, bad_recipe):
    args = [a.format(recipe=recipe, bad=bad_recipe) for a in args]
    result = probe(tmp_path, *args)
    assert result["exit_code"] in (0, 2, None)
    assert result["heavy"] == [], args


@pytest.mark.parametrize("args", [
    ["--help"], ["schema"], ["validate", "{recipe}"], ["validate", "{bad}"], ["recipe", "show", "{recipe}"],
])
def test_plain_text_commands_do_not_import_rich(args, tmp_path, recipe, bad_recipe):
    # Importing rich is about a tenth of validate's start-up; these commands print plain text.
    args = [a.format(recipe=recipe, bad=bad_recipe) for a in args]
    result = probe(tmp_path, *args, modules=("rich",))
    assert result["exit_code"] in (0, 2, None)
    assert result["heavy"] == [], args


def test_the_probe_can_see_a_heavy_import(tmp_path):
    # Guards the test above: the probe must notice a heavy module when one is imported.
    code = IMPORT_PROBE.format(heavy=HEAVY).replace("from ftcli.cli.entry import main", "import yaml as torch; "
                                                    "sys.modules['torch'] = torch\nfrom ftcli.cli.entry import main")
    report = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-c", code, str(report), "--help"], capture_output=True, timeout=60)
    assert json.loads(report.read_text())["heavy"] == ["torch"]


def test_plain_validate_never_imports_typer(tmp_path, recipe, bad_recipe):
    # The plain form is parsed by ftcli.cli.validate (Typer is about a fifth of validate's start-up) ...
    for args in (["validate", recipe], ["validate", recipe, bad_recipe, "--json", "--set", "training.seed=3"]):
        assert probe(tmp_path, *args, modules=("typer",))["heavy"] == [], args
    # ... and every other form still goes through Typer (the probe does see it).
    assert probe(tmp_path, "validate", "--help", modules=("typer",))["heavy"] == ["typer"]


# The installed `ftcli` program, and the same arguments through the Typer command alone (no plain-validate path).
THROUGH_ENTRY = "import sys; sys.argv[0] = 'ftcli'; from ftcli.cli.entry import main; main()"
THROUGH_TYPER = "import sys; sys.argv[0] = 'ftcli'; from ftcli.cli.app import main; main()"


@pytest.mark.parametrize("args", [
    ["validate", "{recipe}"],
    ["validate", "{recipe}", "{bad}"],
    ["validate", "{bad}", "--json"],
    ["validate", "{missing}"],
    ["validate", "--json", "{recipe}", "--set", "training.seed=3", "--set=method.r=4"],
    ["validate", "{recipe}", "--set", "training.lr=-1", "--json"],
    ["validate", "{recipe}", "--set", "nokey"],
    ["validate", "{recipe}", "--set"],
    ["validate", "{recipe}", "--set", "--json"],
    ["validate"],
    ["validate", "{recipe}", "--unknown"],
])
def test_plain_validate_answers_exactly_as_the_typer_command(args, tmp_path, recipe, bad_recipe):
    args = [a.format(recipe=recipe, bad=bad_recipe, missing=tmp_path / "missing.yaml") for a in args]

    def run(command):
        proc = subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        return proc.returncode, proc.stdout, proc.stderr

    plain, typer_path = run(["-c", THROUGH_ENTRY]), run(["-c", THROUGH_TYPER])
    assert plain == typer_path
    assert plain[0] in (0, 2)


def best_of(times: int, *args, cwd=None) -> float:
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ftcli", *map(str, args)], capture_output=True, cwd=cwd,
                              stdin=subprocess.DEVNULL, timeout=60)
        best = min(best, time.perf_counter() - started)
        assert proc.returncode in (0, 2), proc.stderr
    return best


@pytest.mark.parametrize("args", [["--help"], ["schema"], ["validate", "{recipe}"]])
def test_light_commands_answer_well_under_a_second(args, recipe):
    elapsed = best_of(3, *[a.format(recipe=recipe) for a in args])
    assert elapsed < 1.0, f"{args}: {elapsed:.2f} s"


def test_validating_the_shipped_recipes_is_fast():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "no shipped recipes found under recipes/"
    elapsed = best_of(2, "validate", *recipes, cwd=REPO)
    assert elapsed < 1.5, f"validate recipes/*.yaml took {elapsed:.2f} s"


@pytest.mark.parametrize("args", [
    ["validate", "{recipe}", "--json"],
    ["validate", "{recipe}", "{bad}", "--json"],
    ["validate", "{recipe}", "--json", "--set", "training.lr"],
    ["validate", "{missing}", "--json"],
    ["recipe", "show", "{recipe}", "--json"],
    ["recipe", "show", "{recipe}", "--json", "--explain", "--set", "training.seed=3"],
    ["schema"],
    ["runs", "list", "--json", "--runs-dir", "{empty}"],
])
def test_json_output_is_exactly_one_document(args, tmp_path, recipe, bad_recipe, cli):
    args = [a.format(recipe=recipe, bad=bad_recipe, missing=tmp_path / "none.yaml", empty=tmp_path / "no-runs")
            for a in args]
    result = cli(*args)
    assert result.exit_code in (0, 2), result
    document = json.loads(result.stdout)  # raises on anything besides one JSON document
    assert isinstance(document, dict)
    assert result.stdout.strip().startswith("{") and result.stdout.endswith("}\n")


@pytest.mark.parametrize("args", [
    ["validate", "{recipe}"], ["recipe", "show", "{recipe}"], ["train", "{recipe}", "--name", "a/b"],
    ["chat", "no-such-run", "--runs-dir", "{root}"], ["--help"],
])
def test_closed_stdin_never_hangs(args, tmp_path, recipe):
    args = [a.format(recipe=recipe, root=tmp_path / "runs") for a in args]
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "ftcli", *args])
    proc = subprocess.run(["bash", "-c", command + " <&-"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode in (0, 2, 5), proc.stderr


def test_recipe_errors_go_to_stderr_with_exit_2(bad_recipe, cli):
    result = cli("validate", bad_recipe)
    assert result.exit_code == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and f"{bad_recipe}:" in result.stderr


def test_output_is_printed_verbatim(tmp_path, cli):
    # rich would print :ok: as an emoji: in a value `recipe show` must reproduce, or in a path.
    folder = tmp_path / "a:ok:b"
    folder.mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text(RECIPE.replace("data:\n", "data:\n  system_prompt: 'Say :ok: when done'\n"))
    shown = cli("recipe", "show", recipe)
    assert shown.exit_code == 0 and "system_prompt: 'Say :ok: when done'" in shown.stdout, shown
    validated = cli("validate", recipe)
    assert validated.exit_code == 0 and validated.stdout == f"ok: {recipe} (run r, method lora)\n", validated
    recipe.write_text(RECIPE.replace("lr: 1e-4", "lr: -1"))
    failed = cli("validate", recipe)
    assert failed.exit_code == 2 and f"{recipe}:" in failed.stderr and "\U0001f197" not in failed.stderr, failed
