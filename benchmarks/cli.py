"""CLI latency: how long `alignet validate`, an error and `datasets list` take to answer.

    python -m benchmarks.cli              # 7 alternating repeats of every command
    python -m benchmarks.cli --repeats 3

Each command is started as a user starts it (a fresh `python -m flows.cli …` process) and timed from
outside: wall seconds and the child's CPU seconds (user + system, the kernel's accounting), medians over
alternating repeats. Two baselines run in the same rounds: a bare `python -c pass` (the interpreter's own
start) and `python -c "import torch, timm"` (what every command paid before preflight stopped importing
them). Ratios are per round, then the median. CPU seconds are the figure to quote on a shared machine: they
do not grow when other work competes for the cores; wall seconds do (the load average is recorded).
Writes `benchmarks/results/cli.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._machine import RESULTS, machine_info, write_result

COMMANDS: dict[str, list[str]] = {
    "python_start": ["-c", "pass"],
    "import_torch_timm": ["-c", "import torch, timm"],
    "validate_demo_config": ["-m", "flows.cli", "validate"],
    "validate_bad_value": ["-m", "flows.cli", "validate", "--set", "cluster.k=-1"],
    "validate_misspelt_model": ["-m", "flows.cli", "validate", "--set", "embed.model=resnt50"],
    "set_without_equals": ["-m", "flows.cli", "run", "--set", "cluster.k"],
    "datasets_list": ["-m", "flows.cli", "datasets", "list", "--root", "/nonexistent-alignet-root"],
    "help": ["-m", "flows.cli", "--help"],
}


def time_command(args: list[str]) -> tuple[float, float, int]:
    """(wall s, child CPU s, exit code) of one fresh process."""
    before = os.times()
    start = time.perf_counter()
    rc = subprocess.run([sys.executable, *args], capture_output=True, timeout=600).returncode
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system), rc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    args = parser.parse_args(argv)
    for name in ("validate_demo_config", "import_torch_timm"):  # warm the page cache and the model-name cache
        time_command(COMMANDS[name])
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            runs[name].append(time_command(command))
    result: dict = {"benchmark": "cli", "repeats": args.repeats, "order": "alternating, every command once a round",
                    "commands": {name: " ".join(["python", *c]) for name, c in COMMANDS.items()}}
    for name, rows in runs.items():
        result[name] = {"wall_s": round(statistics.median(r[0] for r in rows), 3),
                        "cpu_s": round(statistics.median(r[1] for r in rows), 3),
                        "wall_s_all": [round(r[0], 3) for r in rows], "exit_codes": sorted({r[2] for r in rows})}
        if name not in ("python_start", "import_torch_timm"):
            for base in ("python_start", "import_torch_timm"):
                result[name][f"cpu_vs_{base}"] = round(statistics.median(
                    r[1] / b[1] for r, b in zip(rows, runs[base], strict=True)), 2)
    result["machine"] = machine_info()
    write_result("cli", result, args.out)
    print(json.dumps({k: v["cpu_s"] for k, v in result.items() if isinstance(v, dict) and "cpu_s" in v}))
    return result


if __name__ == "__main__":
    main()
