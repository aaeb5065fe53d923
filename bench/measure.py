"""Measuring helpers for bench/run.py: child processes with their peak RSS, step logs -> tokens/s, ratios, test data.

Pure standard library (no torch), so `python -m bench.run --help` and the tests stay fast.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import stat
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The glibc malloc settings ftcli applies in-process (ftcli/training/session.py _speed_up_allocator), as environment
# variables: given to the hand-written script when its settings are to match ftcli's.
MATCHED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


@dataclass
class ChildResult:
    """One finished child process: exit code, wall time and the peak resident memory of it and its children."""

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    started_at: float = 0.0            # epoch seconds at the start (step logs carry epoch times too)
    cpu_samples: list = field(default_factory=list)   # (epoch s, CPU s of the child so far), every ~0.2 s
    cpu_s: float = 0.0                 # CPU time of the child (user + system)
    others_cpu_share: float | None = None   # share of the machine's CPU other processes used meanwhile (noise)
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_child(command: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              log_dir: Path | None = None, timeout_s: float | None = None) -> ChildResult:
    """Run `command` to completion; its peak RSS comes from wait4's rusage (this child and the children it waited for:
    the largest of them, in bytes). Output goes to files, never pipes, so a chatty child cannot block."""
    import tempfile

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="bench-child-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    busy_before = machine_busy_seconds()
    started_at = time.time()
    started = time.perf_counter()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = CpuSampler(process.pid)
        status, rusage = wait_with_rusage(process, timeout_s)
        sampler.stop()
    wall = time.perf_counter() - started
    busy_after = machine_busy_seconds()
    returncode = os.waitstatus_to_exitcode(status)
    process.returncode = returncode  # reaped here, not by Popen
    stderr = stderr_path.read_text(encoding="utf-8", errors="replace")
    cpu = rusage.ru_utime + rusage.ru_stime
    others = None
    if busy_before is not None and busy_after is not None and wall > 0:
        others = others_cpu_share(busy_after - busy_before, cpu, wall, os.cpu_count() or 1)
    return ChildResult(command=[str(c) for c in command], returncode=returncode, wall_s=round(wall, 3),
                       peak_rss_bytes=rusage.ru_maxrss * 1024,  # Linux reports KiB
                       started_at=started_at, cpu_samples=sampler.samples, cpu_s=round(cpu, 2),
                       others_cpu_share=others,
                       stdout=stdout_path.read_text(encoding="utf-8", errors="replace"),
                       stderr_tail=stderr[-3000:])


def machine_busy_seconds(stat_text: str | None = None) -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat's first line)."""
    try:
        text = stat_text if stat_text is not None else Path("/proc/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cpu_share(busy_s: float, own_cpu_s: float, wall_s: float, cores: int) -> float:
    """The share of the machine's CPU capacity that other processes used while a child ran: 0 on a quiet
    machine; 0.5 on 2 cores means another process kept one core busy the whole time."""
    return round(min(1.0, max(0.0, busy_s - own_cpu_s) / (wall_s * cores)), 3)


class CpuSampler:
    """Samples a running process's own CPU time (/proc/PID/stat utime + stime) with the wall clock, so the CPU a
    training spent inside its timed steps can be told apart from its start-up."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s, self.samples = pid, interval_s, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        while not self._done.is_set():
            try:
                fields = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return
            # after the command name: state is field 3, utime and stime are fields 14 and 15 (man 5 proc)
            self.samples.append((time.time(), (int(fields[11]) + int(fields[12])) / ticks))
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(1)


def cpu_seconds_between(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """CPU seconds a sampled process spent between two epoch times (linear between samples); None when the samples
    do not cover the interval."""
    if len(samples) < 2 or start < samples[0][0] or end > samples[-1][0] or end <= start:
        return None

    def at(moment: float) -> float:
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t0 <= moment <= t1:
                return c0 + (c1 - c0) * ((moment - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return samples[-1][1]

    return at(end) - at(start)


def wait_with_rusage(process: subprocess.Popen, timeout_s: float | None):
    """Reap `process` (killed after timeout_s) and return (wait status, its rusage). A blocking wait4, so the wall
    time of a 50 ms command is measured to the millisecond; a timer thread does the killing."""
    timer = threading.Timer(timeout_s, process.kill) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        _, status, rusage = os.wait4(process.pid, 0)
    finally:
        if timer:
            timer.cancel()
    return status, rusage


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_records(records: list[dict]) -> list[dict]:
    """Per-step training records (with loss, num_tokens and time), one per step, in step order."""
    by_step: dict[int, dict] = {}
    for record in records:
        if "loss" in record and "num_tokens" in record and "time" in record:
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def steady_throughput(records: list[dict], *, skip: int, min_steps: int = 2) -> dict | None:
    """Real tokens per second over the steps after the first `skip` (warm-up) ones.

    The window runs from the log of step `skip` to the log of the last step, so it covers whole steps only. Tokens are
    the difference of the cumulative num_tokens. None when fewer than `min_steps` steps remain after the warm-up (two
    by default; one for an arm capped by a time budget, whose single steps are long)."""
    steps = train_records(records)
    if skip < 1 or len(steps) < skip + max(1, min_steps):
        return None
    first, last = steps[skip - 1], steps[-1]
    seconds = float(last["time"]) - float(first["time"])
    count = int(last["step"]) - int(first["step"])
    if seconds <= 0 or count <= 0:
        return None
    tokens = float(last["num_tokens"]) - float(first["num_tokens"])
    return {"tokens_per_s": round(tokens / seconds, 2), "steps_per_s": round(count / seconds, 4), "steps": count,
            "tokens": round(tokens, 1),
            "seconds": round(seconds, 3), "first_step": int(first["step"]) + 1, "last_step": int(last["step"]),
            "window": [float(first["time"]), float(last["time"])]}


def step_times(records: list[dict], *, skip: int) -> list[list[float]]:
    """[step, real tokens, seconds] of each step after the first `skip`, from consecutive log lines."""
    steps = train_records(records)
    return [[int(b["step"]), float(b["num_tokens"]) - float(a["num_tokens"]), float(b["time"]) - float(a["time"])]
            for a, b in zip(steps[skip - 1:], steps[skip:]) if int(b["step"]) == int(a["step"]) + 1]


def paired_step_ratio(side_runs: list[dict], other_runs: list[dict]) -> dict | None:
    """Tokens/s of one side over the other's from the same steps of both: when both trained the same batches (the
    same real tokens at every step), the median over every pair of runs and every step of other's step time / side's.
    A step slowed by another process then moves the median little, where it moves a run's tokens/s; None when the
    batches differ."""

    def by_step(run: dict) -> dict[int, tuple[float, float]]:
        return {step: (tokens, seconds) for step, tokens, seconds in run.get("step_times") or []}

    ratios, per_run_pair = [], []
    others = [by_step(run) for run in other_runs]
    for mine in map(by_step, side_runs):
        for theirs in others:
            pair = []
            for step in sorted(set(mine) & set(theirs)):
                if mine[step][0] != theirs[step][0]:
                    return None
                if mine[step][1] > 0:
                    pair.append(theirs[step][1] / mine[step][1])
            ratios += pair
            if pair:
                per_run_pair.append(statistics.median(pair))
    if not ratios:
        return None
    # The spread over pairs of runs: how far one pair of runs can land from the overall figure on this machine.
    return {"ratio": round(statistics.median(ratios), 3), "pairs": len(ratios),
            "run_pairs_range": [round(min(per_run_pair), 3), round(max(per_run_pair), 3)]}


def final_value(records: list[dict], key: str) -> float | None:
    """The last value of `key` in the records (eval_loss, loss ...), None when absent."""
    values = [r[key] for r in records if key in r]
    return float(values[-1]) if values else None


def median(values: list[float | None]) -> float | None:
    """Median of the known values (None ignored); None when there are none."""
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, rounded; None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)


def goal(value: float | None, *, at_least: float | None = None, at_most: float | None = None) -> bool | None:
    """Whether value meets the bound(s); None when it was not measured."""
    if value is None:
        return None
    if at_least is not None and value < at_least:
        return False
    if at_most is not None and value > at_most:
        return False
    return True


def interleaved(arms: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, arm) in run order: every arm once per repeat, the order rotated each repeat (A B, B A, ...), so slow
    phases of a noisy machine hit every arm alike."""
    order = []
    for repeat in range(repeats):
        shift = repeat % len(arms)
        order.extend((repeat, arm) for arm in arms[shift:] + arms[:shift])
    return order


def parse_meminfo(text: str) -> dict[str, int]:
    """Bytes of the /proc/meminfo fields (MemTotal, MemAvailable, ...)."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values


def machine_info() -> dict:
    """nproc, memory, CPU model, load average and OS of this machine."""
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = parse_meminfo(Path("/proc/meminfo").read_text(encoding="utf-8"))
    except OSError:
        memory = {}
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "memory_total_bytes": memory.get("MemTotal"),
            "memory_available_bytes": memory.get("MemAvailable"),
            "load_average": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "python": platform.python_version()}


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder (links not followed: a linked folder counts nothing); 0 when absent."""
    total = 0
    for root, _dirs, files in os.walk(path):   # does not descend into linked folders
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:   # removed meanwhile
                continue
            total += 0 if stat.S_ISLNK(info.st_mode) else info.st_size
    return total


# ---------------------------------------------------------------------------------------------- data


def varied_chat_records(count: int, seed: int = 0) -> list[dict]:
    """Chat examples of varied length, skewed short with a long tail, as real chat data is: a short question and an
    answer of 1..~120 numbers ("Count from 17 in steps of 3, 9 numbers."). About 4 tokens per number with SmolLM2's
    tokenizer, so lengths run from ~45 to ~500 tokens: some exceed 256 and fill whole batches at max_length."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        numbers = min(120, 1 + int(rng.expovariate(1 / 16)))
        start, stride = rng.randrange(1, 500), rng.randrange(1, 10)
        question = f"Count from {start} in steps of {stride}, {numbers} numbers."
        answer = ", ".join(str(start + i * stride) for i in range(numbers))
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


# The vocabulary of synthetic_chat_records (the words of /tmp/scale/gen.py, the data ftcli's data rewrite was sized on)
CHAT_WORDS = ("the a model data train token learn fast slow cat dog run jump over under river mountain code python "
              "value answer question").split()


def synthetic_chat_records(count: int, seed: int = 0) -> Iterator[dict]:
    """Chat examples of steady size for the data-preparation comparison, one at a time (a file of millions is written
    without holding them): a question of 20..45 and an answer of 25..50 words from a small vocabulary, ~480 bytes of
    JSON and ~109 tokens with SmolLM2's chat template (its default system prompt included). Deterministic, and the
    first n records are the same for any count, so every size is a prefix of the larger ones."""
    rng = random.Random(seed)
    for i in range(count):
        question = " ".join(rng.choice(CHAT_WORDS) for _ in range(rng.randint(20, 45)))
        answer = " ".join(rng.choice(CHAT_WORDS) for _ in range(rng.randint(25, 50)))
        yield {"messages": [{"role": "user", "content": f"Q{i}: {question}?"},
                            {"role": "assistant", "content": answer + "."}]}


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write the records one line each, as they come (a generator is never held whole); through a temporary file, so
    an interrupted write leaves no short file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    partial.replace(path)
    return path
