"""glibc's malloc thresholds for the stage processes (`alignet_core.runtime.malloc.STAGE_PROCESS`) against
glibc's defaults (`ALIGNET_MALLOC=default`), side by side in one run.

    python -m benchmarks.malloc [--quick]        # the stages' torch kernels, each in a fresh process
    python -m benchmarks.malloc --demo           # also `alignet demo` twice each way (~22 min on 2 cores)

Kernels (each in its own interpreter, as the settings are the process's; rounds alternate the two settings,
the order reversed every other round): the demo teacher's forward (Lite2, packaged weights, 260 px, batches
of 64, `embed`'s BatchNorm-folded channels_last inference model) over 256 random images, and 40 training
steps of the demo's student (Lite0 at 64 px, 16 triplets of 46 images, the whole student: its activations
are the largest the demo trains). Per run: wall, user and system CPU seconds, minor page faults, peak
resident memory. `--demo`: the whole `alignet demo` from this checkout on a fresh root per run (Prefect
server, every stage, no cache), its wall time, stage seconds (from its summary), CPU seconds and peak
resident memory (the largest of its processes), and what it computed (dataset version, stage keys, the
people figures: `same_results` says whether both settings gave the same). Writes results/malloc.json (`--quick`: malloc_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from benchmarks._machine import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"glibc_default": {"ALIGNET_MALLOC": "default"}, "stage_process": {"ALIGNET_MALLOC": ""}}

KERNEL = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from alignet_core.runtime.malloc import STAGE_PROCESS, set_malloc_thresholds

    set_malloc_thresholds(STAGE_PROCESS)  # as the CLI does; a no-op under ALIGNET_MALLOC=default
    kernel, n = sys.argv[1], int(sys.argv[2])
    if kernel == "teacher_forward":
        from alignet_core.config.embed import EmbedConfig
        from alignet_core.embed.extractor import _inference_model
        from alignet_core.models.factory import pooled_features

        cfg = EmbedConfig(model="tf_efficientnet_lite2", weights="packaged", batch_size=64)
        model, _ = _inference_model(cfg, torch.device("cpu"), None)
        x = torch.randn(n, 3, 260, 260, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)

        def work():
            with torch.inference_mode():
                for i in range(0, n, cfg.batch_size):
                    pooled_features(model, x[i:i + cfg.batch_size])
    else:
        from alignet_core.distill.objective import AdamDecayToInit
        from alignet_core.models.student import build_student
        from benchmarks._timing import demo_step_inputs, training_step

        cfg, _, x, rows, sims = demo_step_inputs(46)
        model = build_student(cfg, 0).train()
        opt = AdamDecayToInit(model.parameters(), lr=3e-4)
        step = training_step(model, opt, x, rows, sims)

        def work():
            for _ in range(n):
                step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                      "minor_faults": r1.ru_minflt - r0.ru_minflt, "peak_rss_mib": r1.ru_maxrss / 1024}))
""")


def _env(setting: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env = {**inherited, "PYTHONPATH": str(REPO), **SETTINGS[setting]}
    if not env["ALIGNET_MALLOC"]:
        del env["ALIGNET_MALLOC"]
    return env


def _kernel(setting: str, kernel: str, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", KERNEL, kernel, str(n)], capture_output=True, text=True, check=True,
                         cwd=REPO, env=_env(setting))
    return json.loads(out.stdout.strip().splitlines()[-1])


#: runs the command in its argv and prints its wall time and its process tree's CPU time and largest peak RSS
#: (RUSAGE_CHILDREN of a fresh process: this run's processes only)
WRAPPER = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    t0 = time.perf_counter()
    with open(sys.argv[1], "w") as log:
        rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - t0, "user_s": r.ru_utime, "sys_s": r.ru_stime,
                      "peak_rss_mib": r.ru_maxrss / 1024}))
""")


def _demo(setting: str, root: Path) -> dict[str, Any]:
    env = {**_env(setting), "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-c", WRAPPER, str(root / "demo.log"),
           sys.executable, "-m", "flows.cli", "demo", "--root", str(root / "data")]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    if run["rc"]:
        raise RuntimeError(f"alignet demo failed (exit {run['rc']}); see {root / 'demo.log'}")
    summary = json.loads(next((root / "data" / "reports").rglob("summary.json")).read_text())
    return {"wall_s": round(run["wall_s"], 2), "stage_seconds": summary["stage_seconds"],
            "user_s": round(run["user_s"], 2), "sys_s": round(run["sys_s"], 2),
            "peak_rss_mib_largest_process": round(run["peak_rss_mib"], 1),
            # what it computed, to compare between the settings (the same bits give the same keys and figures)
            "dataset_version": summary["dataset_version"], "stage_keys": summary["stage_keys"],
            "people_changes": summary["people"]["changes"]}


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small kernels, one round: checks the code, not a result")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--demo", action="store_true", help="also the whole demo, --demo-rounds times each way")
    ap.add_argument("--demo-rounds", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = {"teacher_forward": 64, "student_steps": 4} if args.quick else {"teacher_forward": 256, "student_steps": 40}
    rounds = 1 if args.quick else args.rounds
    before = machine_info()
    kernels: dict[str, Any] = {}
    for kernel, n in sizes.items():
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
        for r in range(rounds):
            for setting in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                runs[setting].append(_kernel(setting, kernel, n))
        med = {s: _medians(v) for s, v in runs.items()}
        kernels[kernel] = {"n": n, "median": med, "runs": runs,
                           "wall_ratio_default_over_stage": round(med["glibc_default"]["wall_s"]
                                                                  / med["stage_process"]["wall_s"], 3)}
    result: dict[str, Any] = {
        "benchmark": "malloc", "quick": args.quick, "rounds": rounds,
        "settings": {"glibc_default": "ALIGNET_MALLOC=default: glibc's dynamic mmap threshold (at most 32 MiB)",
                     "stage_process": "alignet_core.runtime.malloc.STAGE_PROCESS: mmap and trim thresholds 1 GiB"},
        "order": "settings alternate, the order reversed every other round; a fresh process per run",
        "kernels": kernels, "machine_before": before,
    }
    if args.demo:
        demos: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
        with tempfile.TemporaryDirectory(prefix="malloc-demo-") as tmp:
            for r in range(args.demo_rounds):
                for setting in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                    root = Path(tmp) / f"{setting}-{r}"
                    root.mkdir()
                    demos[setting].append(_demo(setting, root))
        med = {s: _medians(v) for s, v in demos.items()}
        first = {s: {k: v[0][k] for k in ("dataset_version", "stage_keys", "people_changes")} for s, v in demos.items()}
        result["demo"] = {"median": med, "runs": demos, "same_results": first["glibc_default"] == first["stage_process"],
                          "wall_ratio_default_over_stage": round(med["glibc_default"]["wall_s"]
                                                                 / med["stage_process"]["wall_s"], 3)}
    result["machine"] = machine_info()
    write_result("malloc_quick" if args.quick else "malloc", result)
    return result


if __name__ == "__main__":
    main()
