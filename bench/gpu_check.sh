#!/usr/bin/env bash
# GPU check for ftcli: peak GPU memory and tokens/s of LoRA and QLoRA at sequence length 512 (gradient checkpointing)
# on random-weight Llama ~1B and ~8B models, against ftcli's memory estimate. Nothing is downloaded.
#   bash bench/gpu_check.sh [bench.gpu_check options, e.g. --sizes 1b]
# Writes bench/gpu_results.json and bench/gpu_results.md; about 8 minutes on one H100/H200-class GPU.
# Without a GPU it says so and exits 0, measuring nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
limit_s="${GPU_CHECK_TIMEOUT_S:-540}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi --query-gpu=name --format=csv,noheader >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing); nothing measured"
    exit 0
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: a GPU is present but $python has no CUDA-enabled torch; nothing measured"
    echo "gpu_check: install a CUDA build of torch (and bitsandbytes) in that environment, then run again"
    exit 0
fi

echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1); limit ${limit_s} s"
cd "$repo"
status=0
timeout --signal=TERM --kill-after=20 "$limit_s" "$python" -m bench.gpu_check "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "gpu_check: stopped after ${limit_s} s; bench/gpu_results.md holds the runs that finished"
fi
echo "gpu_check: results in bench/gpu_results.md"
exit "$status"
