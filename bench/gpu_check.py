"""GPU check: peak GPU memory and tokens/s of `ftcli train` (LoRA and QLoRA, sequence length 512, gradient
checkpointing) on random-weight Llama models built from real configs, against ftcli's memory estimate.

    bash bench/gpu_check.sh                 # the entry point: exits cleanly when there is no GPU
    python -m bench.gpu_check [--sizes 1b 8b] [--steps 8] [--out bench]
    python -m bench.gpu_check --cpu-smoke   # the same plumbing on a tiny model on the CPU (tests the script only)

Nothing is downloaded: the model configs are written here (Llama 3.2 1B- and Llama 3.1 8B-shaped), the weights are
random, and the tokenizer is the embedded SmolLM2 one (its ids are a subset of the 128,256-token vocabulary; speed
and memory depend on the vocabulary size, not on what the tokens mean). Writes gpu_results.json and gpu_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.measure import (
    read_jsonl,
    run_child,
    steady_throughput,
    varied_chat_records,
    wait_with_rusage,
    write_jsonl,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "max_position_embeddings": 8192, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False}
CONFIGS = {
    "1b": {**LLAMA, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {**LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False},
    "tiny": {**LLAMA, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 49152, "tie_word_embeddings": True},
}
METHODS = {
    "lora": "method: {kind: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}\n",
    "qlora": "method: {kind: qlora, r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}\n"
             "quantization: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: auto}\n",
}
SEQUENCE_LENGTH = 512


def build_model(size: str, folder: Path, tokenizer_dir: Path, device: str) -> Path:
    """A random-weight model of the named config, saved as safetensors (bf16 on a GPU) with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(CONFIGS[size])
    fields.pop("model_type")
    config = LlamaConfig(**fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):   # initialised where it will train: an 8B model is built in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def long_chat_records(count: int) -> list[dict]:
    """Chat examples longer than the sequence length, so every batch is full (no padding)."""
    records = varied_chat_records(count * 8, seed=1)
    long = [r for r in records if len(r["messages"][1]["content"]) > 4 * SEQUENCE_LENGTH]
    for record in records:   # stretch short ones: the answer repeated until long enough
        if len(long) >= count:
            break
        answer = record["messages"][1]["content"]
        while len(answer) <= 4 * SEQUENCE_LENGTH:
            answer = f"{answer}, {answer}"
        long.append({"messages": [record["messages"][0], {"role": "assistant", "content": answer}]})
    return long[:count]


def write_recipe(path: Path, model_dir: Path, data: Path, method: str, steps: int, batch: int, device: str) -> Path:
    path.write_text(
        f"model: {{path: {model_dir}, device: {device}}}\n{METHODS[method]}"
        f"data: {{train: {data}, format: chat, max_length: {SEQUENCE_LENGTH}, train_on: all}}\n"
        f"training: {{max_steps: {steps}, batch_size: {batch}, lr: 1.0e-4, gradient_checkpointing: true, "
        f"logging_steps: 1, save_steps: 1000000, group_by_length: false}}\n", encoding="utf-8")
    return path


class GpuMemoryPoller:
    """Highest GPU memory nvidia-smi reports for one process (context + caching allocator), polled 4 times a second."""

    def __init__(self, pid: int):
        self.pid, self.peak_bytes, self._stop = pid, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,"
                                       "nounits"], capture_output=True, text=True, timeout=5, check=False).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in text.splitlines():
                pid, _, mib = (part.strip() for part in line.partition(","))
                if pid == str(self.pid) and mib.isdigit():
                    self.peak_bytes = max(self.peak_bytes or 0, int(mib) * 2**20)
            self._stop.wait(0.25)


def child_main(recipe: str, runs_dir: str, stats_path: str) -> None:
    """Run `ftcli train` in this process, then record the CUDA caching allocator's peaks."""
    from ftcli.cli.app import app

    code = 0
    try:   # without standalone mode a handled error comes back as its exit code
        returned = app(["train", recipe, "--runs-dir", runs_dir, "--overwrite", "--json"], standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:  # a failed training still reports its memory
        code = 1
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
    stats = {"exit": code}
    import torch

    if torch.cuda.is_available():
        stats.update(max_allocated_bytes=torch.cuda.max_memory_allocated(),
                     max_reserved_bytes=torch.cuda.max_memory_reserved())
    Path(stats_path).write_text(json.dumps(stats), encoding="utf-8")
    sys.exit(code)


def estimates(work: Path, size: str, recipes: dict[str, Path]) -> dict[str, dict]:
    """ftcli's memory estimate (as `ftcli train --dry-run`) of each recipe, in one child process."""
    spec = work / f"{size}-spec.json"
    spec.write_text(json.dumps([{"key": key, "recipe": str(path)} for key, path in recipes.items()]), encoding="utf-8")
    result = run_child([sys.executable, "-m", "bench.probes", "estimate", str(spec)], cwd=REPO,
                       log_dir=work / "logs" / f"{size}-estimate", timeout_s=300)
    if not result.ok:
        print(f"gpu_check: estimate failed: {result.stderr_tail[-800:]}", flush=True)
        return {}
    return {key: value["memory"] for key, value in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def measure(name: str, recipe: Path, memory: dict, work: Path, args) -> dict:
    """One `ftcli train` in a child process, its GPU memory polled; tokens/s from its metrics.jsonl."""
    from ftcli.runs.rundir import RunDir

    stats_path = work / f"{name}-stats.json"
    command = [sys.executable, "-m", "bench.gpu_check", "--child", str(recipe), str(work / "runs"), str(stats_path)]
    log_dir = work / "logs" / name
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)
        with GpuMemoryPoller(process.pid) as poller:
            status, rusage = wait_with_rusage(process, args.run_timeout)
    returncode = os.waitstatus_to_exitcode(status)
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    steady = steady_throughput(read_jsonl(RunDir(work / "runs", name).metrics_path), skip=2)
    # GPU: what nvidia-smi saw (else the caching allocator's peak); the CPU smoke test: the peak RSS
    measured = poller.peak_bytes or stats.get("max_reserved_bytes") or (
        rusage.ru_maxrss * 1024 if args.cpu_smoke else None)
    size, method = name.split("-", 1)
    result = {
        "model": size, "method": method, "ok": returncode == 0, "wall_s": round(time.perf_counter() - started, 1),
        "measured_bytes": measured,
        "tokens_per_s": steady["tokens_per_s"] if steady else None, "steady": steady,
        "gpu_peak_nvidia_smi_bytes": poller.peak_bytes, "torch_max_allocated_bytes": stats.get("max_allocated_bytes"),
        "torch_max_reserved_bytes": stats.get("max_reserved_bytes"), "estimate_bytes": memory.get("total_bytes"),
        "estimate_parts": memory.get("parts"),
        "estimate_over_measured": round(memory["total_bytes"] / measured, 3) if measured and memory else None,
    }
    if returncode != 0:
        result["error"] = (log_dir / "stderr.txt").read_text(encoding="utf-8", errors="replace")[-1500:]
    return result


def render(results: dict) -> str:
    def mib(value):
        return "n/a" if value is None else f"{value / 2**20:,.0f}"

    lines = ["# ftcli GPU check", "", f"{results['device']}; {results['date']}; sequence length {SEQUENCE_LENGTH}, "
             f"batch {results['batch']}, {results['steps']} steps, gradient checkpointing, LoRA r 16 on all linear "
             "layers; random weights (configs in bench/gpu_check.py). Measured = the most nvidia-smi reported for "
             "the training process (CUDA context + caching allocator); the estimate is `ftcli train --dry-run`.", "",
             "| model | method | tokens/s | measured MiB | torch max allocated MiB | max reserved MiB | estimate MiB "
             "| estimate / measured | within 15% |", "|---|---|---|---|---|---|---|---|---|"]
    if results["device"].startswith("CPU"):
        lines[2] += " CPU smoke test: measured = peak RSS."
    for r in results["runs"]:
        value = r.get("estimate_over_measured")
        within = "n/a" if value is None else ("yes" if abs(value - 1) <= 0.15 else "**no**")
        lines.append(f"| {r['model']} | {r['method']} | {r.get('tokens_per_s')} | {mib(r.get('measured_bytes'))}"
                     f" | {mib(r.get('torch_max_allocated_bytes'))} | {mib(r.get('torch_max_reserved_bytes'))} | "
                     f"{mib(r.get('estimate_bytes'))} | {value} | {within} |")
    failures = [f"- {r['model']} {r['method']} failed: `{(r.get('error') or '').strip().splitlines()[-1:]}`"
                for r in results["runs"] if not r["ok"]]
    return "\n".join(lines + [""] + failures).rstrip() + "\n"


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=["1b", "8b"], default=["1b", "8b"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--run-timeout", type=int, default=240, help="seconds per training run")
    parser.add_argument("--out", type=Path, default=BENCH)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the plumbing only")
    args = parser.parse_args()

    import datetime

    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch; nothing measured")
        return 0
    sizes = ["tiny"] if args.cpu_smoke else args.sizes
    from ftcli.models.load import resolve_model
    from ftcli.recipe.schema import ModelConfig

    tokenizer_dir = resolve_model(ModelConfig(path="builtin:smollm2-135m-instruct")).local_dir
    work = Path(tempfile.mkdtemp(prefix="ftcli-gpu-check-"))
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU smoke test (not a GPU result)",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "steps": args.steps, "batch": args.batch, "runs": [], "torch": torch.__version__}
    data = write_jsonl(work / "train.jsonl", long_chat_records(max(64, args.steps * args.batch)))
    try:
        for size in sizes:
            started = time.perf_counter()
            model_dir = build_model(size, work / f"model-{size}", tokenizer_dir, device)
            print(f"gpu_check: built {size} in {time.perf_counter() - started:.0f} s", flush=True)
            recipes = {f"{size}-{method}": write_recipe(work / f"{size}-{method}.yaml", model_dir, data, method,
                                                        args.steps, args.batch, device) for method in args.methods}
            memory = estimates(work, size, recipes)
            for name, recipe in recipes.items():
                result = measure(name, recipe, memory.get(name, {}), work, args)
                print(f"gpu_check: {name}: {json.dumps(result)}", flush=True)
                results["runs"].append(result)
                _write(args.out, results)
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        _write(args.out, results)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in results["runs"]) else 1


def _write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_results.md").write_text(render(results), encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
