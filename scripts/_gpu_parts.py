"""The GPU check's parts (scripts/gpu_check.py): what each runs and how it is sized (`parts`), running one
(`run_part`: its commands in their own process groups, within its timeout and the check's deadline), and
reading its outcome (`junit_outcomes`, `headline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from _gpu_wheels import (REPO, SITE, WHEELHOUSE, check_imports, check_wheelhouse, install, read_manifest, requirements,
                         resolve_offline)


@dataclasses.dataclass
class Part:
    """One part of the check: its commands (argument lists after `python`), time estimate and timeout on an
    H100, and (for the tests) the pytest JUnit file it writes."""

    name: str
    commands: list[list[str]]
    estimate_s: float
    timeout_s: float
    what: str


def parts(dry_run: bool, scratch: Path, all_tests: bool = False) -> list[Part]:
    """The parts with their sizes: the device check's, or (`dry_run`) tiny CPU ones that run the same code."""
    junit = str(scratch / "gpu_tests.xml")
    jpegs = str(scratch / "jpegs")
    if not dry_run:
        return [
            Part("install", [], 10, 40, "the carried wheels the image lacks, offline; imports checked"),
            Part("tests", [["-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/gpu", "--junitxml", junit]], 60, 110,
                 "pytest -m gpu tests/gpu"),
            Part("kmeans", [["-m", "benchmarks.kmeans", "--gpu"]], 20, 45, "1.28M × 1152, k = 500, 20 iterations"),
            Part("embed", [["-m", "benchmarks.embed", "--gpu", "--images", "10000", "--jpeg-dir", jpegs],
                           ["-m", "benchmarks.embed", "--gpu", "--images", "10000", "--jpeg-dir", jpegs,
                            "--decode", "torchvision"]], 40, 75, "ViT-B/16 bf16: in memory and from JPEGs"),
            Part("distill", [["-m", "benchmarks.distill", "--gpu"]], 40, 75, "ViT-B/16 student: ours vs a bare loop"),
            Part("rehearsal", [["-m", "benchmarks.rehearsal"]], 90, 135, "the pipeline's stages, projected"),
        ]
    marker = "gpu" if all_tests else "gpu and not slow"
    return [
        Part("install", [], 5, 120, "dry: the manifest parses; the wheelhouse, if any, resolves offline"),
        Part("tests", [["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", marker, "tests/gpu",
                        "--junitxml", junit]], 30, 300, f"pytest -m '{marker}' tests/gpu on the CPU"),
        Part("kmeans", [["-m", "benchmarks.kmeans", "--gpu", "--device", "cpu", "--n", "3000", "--p", "16", "--k", "20",
                         "--niter", "3"]], 5, 120, "torch k-means, small"),
        Part("embed", [["-m", "benchmarks.embed", "--gpu", "--device", "cpu", "--model", "test_vit", "--images", "48",
                        "--batch-size", "4", "--workers", "1", "--iters", "2", "--warmup", "1", "--jpeg-dir", jpegs, *d]
                       for d in ([], ["--decode", "torchvision"])], 20, 240, "test_vit, 48 JPEGs"),
        Part("distill", [["-m", "benchmarks.distill", "--gpu", "--device", "cpu", "--model", "test_vit", "--image-size",
                          "32", "--batch", "4", "--steps", "2", "--warmup", "1", "--repeats", "1", "--pool", "40",
                          "--workers", "0"]], 10, 120, "test_vit at 32 px"),
        Part("rehearsal", [["-m", "benchmarks.rehearsal", "--device", "cpu", "--images", "240", "--image-px", "48",
                            "--model", "test_vit", "--k", "4", "--triplets", "4000", "--human", "2000", "--steps", "2",
                            "--batch", "4", "--student", "test_vit", "--student-px", "32", "--workers", "2"]], 20, 240,
             "240 JPEGs, test_vit, k = 4, 4,000 triplets, 2 steps"),
    ]


def run_command(cmd: list[str], env: dict[str, str], timeout: float, log: Any) -> dict:
    """Run `python <cmd>` in the repository in its own process group; kill the group at `timeout`. Returns
    its exit status, seconds, whether it timed out, the last JSON object line of its output (a benchmark's
    result) and the tail of its output."""
    full = [sys.executable, *cmd]
    log.write(f"\n$ {shlex.join(full)}\n")
    log.flush()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(full, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
        else:
            try:  # loader workers, Dask nannies: nothing of a finished part outlives it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        text = out.read()
    log.write(text)
    log.flush()
    result = None
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    return {"command": shlex.join(full), "returncode": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - t0, 1), "result": result, "tail": text[-2500:]}


def junit_outcomes(path: Path) -> dict:
    """Each test's outcome from pytest's JUnit XML: counts and {test: {outcome, seconds, message}}."""
    if not path.is_file():
        return {"error": f"{path.name} was not written"}
    tests: dict[str, dict[str, Any]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:1500]
                break
        tests[name] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 2), "message": message}
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def part_env(dry_run: bool) -> dict[str, str]:
    """The parts' environment: the installed wheels and the repository first on the path, no progress bars,
    unbuffered output, no pytest plugins from the image; the CPU for the GPU tests in a dry run."""
    path = [str(SITE)] if SITE.is_dir() and not dry_run else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    if dry_run:
        env["ALIGNET_GPU_TESTS_DEVICE"] = "cpu"
        env["OMP_NUM_THREADS"] = "1"  # tiny problems on a shared machine
    return env


def headline(name: str, record: dict, dry_run: bool) -> str:
    """One line of the summary for a part, from its result."""
    results = [r["result"] for r in record.get("runs", []) if r.get("result")]

    def mark(ok: bool | None) -> str:
        return "n/a on the CPU" if dry_run or ok is None else ("met" if ok else "MISSED")

    try:
        if name == "install" and dry_run:
            return f"{record.get('pins', 0)} pins; wheelhouse: {record.get('wheelhouse', 'none here')}"
        if name == "install":
            errors = record.get("imports", {}).get("errors")
            return (f"{len(record.get('install', {}).get('installed', []))} wheels installed; "
                    + (f"import errors: {errors}" if errors else "every import works"))
        if name == "tests":
            counts = record.get("junit", {}).get("counts", {})
            return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no outcomes"
        if name == "kmeans" and results:
            r = results[0]
            return (f"Lloyd {r['lloyd_s']['torch']} s (target ≤ {r.get('target_lloyd_s')}: {mark(r.get('meets_target'))}), "
                    f"{r['lloyd_tflops']['torch']} TFLOP/s; cluster-stage work {r['stage_s']} s")
        if name == "embed" and results:
            return "; ".join(f"{r['decode']}: MFU {r['mfu']} (≥ {r.get('target_mfu')}: {mark(r.get('meets_mfu_target'))}), "
                             f"end to end / in memory {r['ratio']} (≥ 0.8: {mark(r.get('meets_target'))})" for r in results)
        if name == "distill" and results:
            r = results[0]
            return (f"ours {r['ours_steps_per_s']} steps/s = {r['ratio']} × bare (≥ 0.9: {mark(r.get('meets_ratio_target'))}),"
                    f" MFU {r['ours_mfu']} (≥ 0.4: {mark(r.get('meets_mfu_target'))})")
        if name == "rehearsal" and results:
            r, p = results[0], results[0]["projection"]
            return (f"stages {r['pipeline_seconds']} s; projected regeneration {p['regeneration_seconds'] / 60:.1f} min "
                    f"(≤ 60: {mark(p.get('meets_target'))}); paper's distillation "
                    f"{p['distill_paper_schedule']['seconds'] / 3600:.1f} h")
    except (KeyError, TypeError, IndexError) as err:
        return f"(result without the expected fields: {err})"
    return ""


def run_part(part: Part, args: argparse.Namespace, env: dict[str, str], deadline: float, log: Any,
             scratch: Path) -> dict:
    """Run one part within its timeout and the check's deadline; its record for gpu_check.json."""
    record: dict[str, Any] = {"what": part.what, "estimate_s": part.estimate_s}
    t0 = time.perf_counter()
    timeout = min(args.timeouts.get(part.name, part.timeout_s), deadline - time.perf_counter())
    record["timeout_s"] = round(timeout, 1)
    if timeout < 5:
        record.update(status="skipped", reason="the check's time budget is spent")
        return record
    try:
        if part.name == "install":
            record.update(install_part(args, env))
        else:
            extra = shlex.split(args.extra.get(part.name, ""))
            runs = []
            for cmd in part.commands:
                left = min(timeout - (time.perf_counter() - t0), deadline - time.perf_counter())
                runs.append(run_command([*cmd, *extra], env, left, log))
                if runs[-1]["timed_out"]:
                    break
            record["runs"] = runs
            if part.name == "tests":
                record["junit"] = junit_outcomes(scratch / "gpu_tests.xml")
    except Exception as err:  # noqa: BLE001 — a broken part is recorded and the check goes on
        record["error"] = f"{type(err).__name__}: {err}"
    runs = record.get("runs", [])
    failed_tests = {k: v for k, v in record.get("junit", {}).get("counts", {}).items() if k in ("failed", "error")}
    if record.get("error") or any(r["returncode"] != 0 for r in runs) or failed_tests \
            or record.get("imports", {}).get("errors") or record.get("imports", {}).get("error"):
        record["status"] = "timeout" if any(r["timed_out"] for r in runs) else "failed"
    else:
        record["status"] = "ok"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["headline"] = headline(part.name, record, args.dry_run)
    return record


def install_part(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Install and check the imports (GPU machine), or check the manifest and the wheelhouse (dry run)."""
    pins = read_manifest()
    if args.dry_run:
        out: dict[str, Any] = {"pins": len(pins), "requirements": requirements(pins)}
        if WHEELHOUSE.is_dir() and any(WHEELHOUSE.glob("*.whl")):
            problems = check_wheelhouse(pins, WHEELHOUSE)
            resolved = resolve_offline(pins, WHEELHOUSE)
            out["wheelhouse"] = (f"{len(list(WHEELHOUSE.glob('*.whl')))} wheels, "
                                 f"{sum(p.stat().st_size for p in WHEELHOUSE.glob('*.whl')) / 2**20:.1f} MiB, "
                                 f"{'resolves offline' if resolved.returncode == 0 else 'does NOT resolve offline'}")
            if problems or resolved.returncode != 0:
                out["error"] = "; ".join(problems) + resolved.stderr[-1500:]
        return out
    if not WHEELHOUSE.is_dir():
        raise FileNotFoundError(f"{WHEELHOUSE} is missing: make gpu-wheels here, then carry .gpu-wheels to the GPU machine")
    out = {"install": install(pins, WHEELHOUSE, SITE)}
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])  # the later parts see the installed wheels
    out["imports"] = check_imports(env)
    return out
