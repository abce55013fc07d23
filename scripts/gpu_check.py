"""The GPU path, proven: the one prepared device check that a session with a GPU machine runs first.

    make gpu-wheels                          # here (a package registry): .gpu-wheels/, ~19 MB of Python 3.12 wheels
    make gpu-check                           # on the GPU machine: python3 scripts/gpu_check.py
    python3 scripts/gpu_check.py --dry-run   # anywhere: every part's code on the CPU, tiny sizes, nothing written

With this workplace's device tool: carry [".gpu-wheels"], command `make gpu-check GPU_CHECK_ARGS="--copy-to $OUT"`
(or `python3 scripts/gpu_check.py --copy-to $OUT`); the results come back in $OUT.

Parts, in order. Each runs as its own process with its own timeout (its process group is killed when it
runs over), a failing part is recorded and the next one runs, and the exit status is 1 when any part
failed. `--parts` runs some of them (a rerun), `--timeout PART=S` and `--extra PART="ARGS"` (appended to
its commands: the benchmarks' own options, e.g. `--extra rehearsal="--images 20000"`) size them.

Time plan on one H100 SXM (989 TFLOP/s dense bf16, ~50 TFLOP/s float32; the H200 computes alike).
ESTIMATES, not measurements: from the FLOPs below at 40-50% of peak, plus each process's start
(Python, torch, CUDA: ~6 s) and model builds (ViT-B/16, random init: ~2 s). ViT-B/16 at 224 px costs
35 GFLOP per image forward, 101 forward + backward (FlopCounterMode). The GPU's arithmetic is the smaller
share: ~1 s for k-means, ~2 s for the embed part, ~10 s for the distill part's 4 PFLOP, ~22 s for the
rehearsal's 9 PFLOP at 400 TFLOP/s; the rest is process starts, JPEG decoding on 16 cores, sampling, files.

| part      | what                                                                  | estimate | timeout |
|-----------|-----------------------------------------------------------------------|---------:|--------:|
| install   | carried wheels the image lacks → .gpu-site/, offline; imports checked |     10 s |    40 s |
| tests     | pytest -m gpu tests/gpu: every CUDA path (models, Dask, a killed run) |     60 s |   110 s |
| kmeans    | benchmarks.kmeans --gpu: 1.28M × 1152, k = 500, 20 iterations          |     20 s |    45 s |
|           |   (29.5 TFLOP of float32 distances + float64 centroid sums)           |          |         |
| embed     | benchmarks.embed --gpu, decode pil and torchvision: ViT-B/16 bf16,    |     40 s |    75 s |
|           |   7,680 images in memory (0.3 PFLOP), 10,000 JPEGs end to end         |          |         |
| distill   | benchmarks.distill --gpu: ViT-B/16 student, 128 triplets (~283        |     40 s |    75 s |
|           |   images, 29 TFLOP) per step, 2 × 35 steps for ours and for the bare  |          |         |
| rehearsal | benchmarks.rehearsal: 30,000 JPEGs → embed (1 PFLOP) → transform →    |     90 s |   135 s |
|           |   k-means k = 500 → 1M triplets, published → 200 distillation steps   |          |         |
|           |   of 128 triplets (7.8 PFLOP)                                         |          |         |
| total     |                                                                       |  ~4.5 min|  ≤ 8 min|

The timeouts add up to the budget (`--budget`, 480 s), so the check ends within 8 minutes whatever
happens, and a 15-minute device lease (a few minutes of it the machine's start) has room for one rerun
of the parts that failed.

Writes `benchmarks/results/gpu/`: `gpu_check.json` (every part: status, seconds, its command, its result
or the tail of its error; the install; the device), `gpu_tests.json` (each test's outcome), `gpu_check.log`
(every part's output) and the benchmarks' own `kmeans_gpu.json`, `embed_gpu.json`,
`embed_gpu_torchvision.json`, `distill_gpu.json`, `rehearsal_gpu.json` (eight files: what the device tool
brings back). `--dry-run` writes nothing there (CPU numbers are never results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The parts and the wheelhouse live beside this file (scripts/_gpu_parts.py, scripts/_gpu_wheels.py): found
# when it runs as `python3 scripts/gpu_check.py` (its folder is sys.path[0]) and when it is loaded otherwise.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _gpu_parts import parts, part_env, run_part  # noqa: E402
from _gpu_wheels import REPO, build_wheelhouse, read_manifest  # noqa: E402

RESULTS_GPU = REPO / "benchmarks" / "results" / "gpu"


def device_description(env: dict[str, str]) -> dict:
    """The GPUs (name, memory), torch's versions and nvidia-smi's view, from a short process."""
    code = ("import json, torch\nprint(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'available': torch.cuda.is_available(), 'gpus': [torch.cuda.get_device_name(i) for i in "
            "range(torch.cuda.device_count())]}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
        "error": done.stderr[-1000:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip().splitlines()
    return info


def summary_lines(report: dict) -> list[str]:
    lines = [f"GPU check {'(CPU dry run) ' if report['dry_run'] else ''}on {report['device'].get('gpus') or 'no GPU'}: "
             f"{report['status']} in {report['seconds']:.0f} s (budget {report['budget_s']:.0f} s)"]
    for name, rec in report["parts"].items():
        lines.append(f"  {name:<9} {rec.get('status', '?'):<8} {rec.get('seconds', 0):>6.1f} s "
                     f"(est. {rec['estimate_s']:.0f}, limit {rec['timeout_s']:.0f})  {rec.get('headline', '')}")
        if rec.get("status") not in ("ok", "skipped"):
            tail = rec.get("error") or next((r["tail"] for r in rec.get("runs", []) if r["returncode"] != 0), "")
            failed = [k for k, v in rec.get("junit", {}).get("tests", {}).items() if v["outcome"] in ("failed", "error")]
            lines += [f"      failed: {t}" for t in failed]
            lines += [f"      | {line}" for line in str(tail).strip().splitlines()[-8:]]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every part's code on the CPU, tiny sizes, nothing written")
    ap.add_argument("--all-tests", action="store_true", help="--dry-run: the slow GPU tests too (worker processes)")
    ap.add_argument("--build-wheels", action="store_true", help="download the wheelhouse (make gpu-wheels) and stop")
    ap.add_argument("--parts", default=None, help="comma-separated parts to run (default: all, in order)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    ap.add_argument("--timeout", action="append", default=[], metavar="PART=S", help="a part's timeout")
    ap.add_argument("--extra", action="append", default=[], metavar="PART=ARGS", help="arguments added to a part's commands")
    ap.add_argument("--copy-to", default=None, help="also copy the result files to this folder (e.g. $OUT)")
    args = ap.parse_args(argv)
    if args.build_wheels:
        info = build_wheelhouse(read_manifest())
        print(json.dumps(info, indent=1))
        return 1 if info["problems"] else 0
    args.timeouts = {k: float(v) for k, v in (t.split("=", 1) for t in args.timeout)}
    args.extra = dict(e.split("=", 1) for e in args.extra)
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    scratch = Path(tempfile.mkdtemp(prefix="alignet-gpu-check-"))
    out_dir = scratch / "results" if args.dry_run else RESULTS_GPU
    out_dir.mkdir(parents=True, exist_ok=True)
    env = part_env(args.dry_run)
    chosen = args.parts.split(",") if args.parts else None
    todo = [p for p in parts(args.dry_run, scratch, args.all_tests) if chosen is None or p.name in chosen]
    if chosen and (unknown := set(chosen) - {p.name for p in parts(args.dry_run, scratch)}):
        ap.error(f"--parts: unknown {sorted(unknown)}")
    report: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "device": device_description(env), "parts": {}}
    with open(out_dir / "gpu_check.log", "w") as log:
        for part in todo:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {part.name}: {part.what} ...", flush=True)
            report["parts"][part.name] = rec = run_part(part, args, env, deadline, log, scratch)
            print(f"[{time.perf_counter() - t_start:6.1f} s] {part.name}: {rec['status']} {rec.get('headline', '')}",
                  flush=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    bad = [n for n, r in report["parts"].items() if r["status"] != "ok"]
    report["status"] = "ok" if not bad else f"{len(bad)} part(s) not ok: {', '.join(bad)}"
    if "tests" in report["parts"]:
        (out_dir / "gpu_tests.json").write_text(json.dumps(report["parts"]["tests"].get("junit", {}), indent=1) + "\n")
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary_lines(report)))
    print(f"results: {out_dir}" + ("  (dry run: a temporary folder)" if args.dry_run else ""))
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(out_dir.glob("*")):
            if path.is_file() and path.stat().st_mtime >= time.time() - report["seconds"] - 5:  # this run's files
                shutil.copy2(path, dest / path.name)
    shutil.rmtree(scratch, ignore_errors=True)  # JPEGs, JUnit file (parsed above); a dry run's results
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
