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
import dataclasses
import email.parser
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "scripts" / "gpu_wheels.txt"
WHEELHOUSE = REPO / ".gpu-wheels"
SITE = REPO / ".gpu-site"
RESULTS_GPU = REPO / "benchmarks" / "results" / "gpu"
#: the wheelhouse's size limit: the working tree and everything carried travel in 64 MiB
MAX_WHEELHOUSE_MB = 60
#: the platform the wheels are for: the GPU machine's Python and processor
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TARGET_PYTHON = "3.12"
#: what the GPU machine's image already holds (/work/.library/device/KINDS.md, read 2026-11-17), as far as
#: the carried wheels' own requirements name it: a requirement is covered by the wheelhouse or by these
IMAGE_HAS = frozenset({
    "numpy", "torch", "torchvision", "timm", "pillow", "scipy", "scikit-learn", "pygments", "urllib3", "zipp",
    "typing-extensions", "packaging", "pyyaml", "jinja2", "markupsafe", "click", "cloudpickle", "msgpack", "psutil",
    "sortedcontainers", "toolz", "fsspec", "filelock", "safetensors", "pluggy", "iniconfig", "pytest",
})
#: what the parts import, checked after the install (with PYTHONPATH as the parts get it)
IMPORTS = ("torch", "torchvision", "timm", "numpy", "PIL", "yaml", "zarr", "numcodecs", "pydantic", "fsspec",
           "filelock", "safetensors", "pytest", "dask", "distributed", "scipy", "sklearn", "tqdm",
           "alignet_core.embed.extract", "alignet_core.cluster.stage", "alignet_core.transform.stage",
           "alignet_core.sample.stage", "alignet_core.distill.train", "benchmarks.rehearsal")


# ----------------------------------------------------------------------------- the wheelhouse
def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """The pins of `scripts/gpu_wheels.txt`: normalized distribution name → version. Every line that is not
    blank or a comment must be `name==version`, each name once (`ValueError` naming the line otherwise)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip() or any(c in version for c in "<>=!~,; "):
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw.strip()!r}")
        key = normalize(name)
        if key in pins:
            raise ValueError(f"{path}:{number}: {name.strip()} is pinned twice (one version of each)")
        pins[key] = version.strip()
    return pins


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one '-'."""
    import re

    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def wheel_metadata(path: Path) -> dict[str, Any]:
    """Name, version and requirements (Requires-Dist) of a wheel file, read from its METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return {"name": normalize(msg["Name"]), "version": msg["Version"], "requires": msg.get_all("Requires-Dist") or []}


def check_wheelhouse(pins: dict[str, str], folder: Path, image_has: frozenset[str] = IMAGE_HAS) -> list[str]:
    """What is wrong with a wheelhouse for `pins` (empty: nothing): a pin without its wheel, a wheel of
    another version or not pinned, two wheels of one name, a requirement of a carried wheel (evaluated for
    Python 3.12 on Linux, extras off) that neither the wheelhouse nor the image (`image_has`) provides,
    or a wheel for another Python or platform."""
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    problems: list[str] = []
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.whl")):
        meta = wheel_metadata(path)
        found.setdefault(meta["name"], []).append({**meta, "file": path.name})
        _, _, _, tags = parse_wheel_filename(path.name)
        if not any(_tag_fits(t.interpreter, t.abi, t.platform) for t in tags):
            problems.append(f"{path.name}: not a wheel for CPython {TARGET_PYTHON} on manylinux x86_64")
    for name, wheels in found.items():
        if len(wheels) > 1:
            problems.append(f"{name}: {len(wheels)} wheels ({', '.join(w['file'] for w in wheels)}); keep one version")
        if name not in pins:
            problems.append(f"{wheels[0]['file']}: not in {MANIFEST.name}; delete it or pin it")
        elif wheels[0]["version"] != pins[name]:
            problems.append(f"{wheels[0]['file']}: version {wheels[0]['version']}, {MANIFEST.name} pins {pins[name]}")
    problems += [f"{name}=={version}: no wheel in {folder}" for name, version in pins.items() if name not in found]
    env = {"python_version": TARGET_PYTHON, "python_full_version": f"{TARGET_PYTHON}.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    for name, wheels in found.items():
        for spec in wheels[0]["requires"]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = normalize(req.name)
            if dep in found:
                if not req.specifier.contains(found[dep][0]["version"], prereleases=True):
                    problems.append(f"{name} needs {spec}; the wheelhouse has {dep} {found[dep][0]['version']}")
            elif dep not in image_has:
                problems.append(f"{name} needs {spec}: neither carried nor in the GPU image")
    return problems


def _tag_fits(interpreter: str, abi: str, platform: str) -> bool:
    py = "cp" + TARGET_PYTHON.replace(".", "")
    interpreter_ok = interpreter in (py, "py3", "py312") or (interpreter.startswith("cp3") and abi == "abi3"
                                                                and int(interpreter[3:]) <= int(py[3:]))
    return interpreter_ok and (platform == "any" or platform in PLATFORMS or (
        platform.startswith("manylinux") and platform.endswith("_x86_64")))


def build_wheelhouse(pins: dict[str, str], folder: Path = WHEELHOUSE, python: str = sys.executable) -> dict:
    """Download every pinned wheel for CPython 3.12 manylinux x86_64 into `folder` (pip, --no-deps), delete
    wheels that are not pinned, check the result (`check_wheelhouse`) and its size. Returns a summary."""
    folder.mkdir(exist_ok=True)
    cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           TARGET_PYTHON, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", str(folder), *[f"{n}=={v}" for n, v in pins.items()]]
    subprocess.run(cmd, check=True)
    for path in folder.glob("*.whl"):
        meta = wheel_metadata(path)
        if pins.get(meta["name"]) != meta["version"]:
            path.unlink()
    problems = check_wheelhouse(pins, folder)
    size = sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20
    if size > MAX_WHEELHOUSE_MB:
        problems.append(f"{folder}: {size:.1f} MiB of wheels, more than the {MAX_WHEELHOUSE_MB} MiB that may travel")
    return {"folder": str(folder), "wheels": len(list(folder.glob("*.whl"))), "mib": round(size, 1),
            "problems": problems}


def resolve_offline(pins: dict[str, str], folder: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    """pip finds every pin in `folder` with no index, as a wheel for CPython 3.12 manylinux x86_64 (the
    dry run's check of the wheelhouse; downloads into a temporary folder and nothing else)."""
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--no-index", "--find-links", str(folder), "--no-deps",
             "--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp",
             *[a for p in PLATFORMS for a in ("--platform", p)], "-d", tmp, *[f"{n}=={v}" for n, v in pins.items()]],
            capture_output=True, text=True, timeout=300)


def requirements(pins: dict[str, str]) -> list[str]:
    """What the install asks pip for: each carried distribution the project depends on directly, with the
    project's own version range (pyproject.toml: dependencies, the dev extra for pytest). pip then installs
    from the wheelhouse only what the machine lacks, or has too old, these and their requirements."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = []
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(spec)
        if normalize(req.name) in pins:
            out.append(str(req))
    return out


def install(pins: dict[str, str], folder: Path, site: Path, python: str = sys.executable,
            wanted: list[str] | None = None) -> dict:
    """Install into `site` (fresh) the carried wheels that pip's resolver, against the machine's own packages,
    finds missing or too old for `wanted` (default `requirements(pins)`); nothing from a network. Returns
    what was installed."""
    problems = check_wheelhouse(pins, folder)
    if site.exists():
        shutil.rmtree(site)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        plan = subprocess.run(
            [python, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--find-links", str(folder),
             "--report", str(report), *(requirements(pins) if wanted is None else wanted)], capture_output=True,
            text=True, timeout=120)
        if plan.returncode != 0 and "--report" in plan.stderr:  # a pip older than 22.2: no resolver report
            return _install_absent(pins, folder, site, python)
        if plan.returncode != 0:
            raise RuntimeError(f"pip cannot resolve the requirements from {folder}:\n{plan.stderr[-3000:]}")
        chosen = json.loads(report.read_text())["install"]
    wheels = [item["download_info"]["url"].removeprefix("file://") for item in chosen]
    if wheels:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *wheels], check=True, capture_output=True, text=True, timeout=300)
    return {"installed": sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in chosen),
            "site": str(site), "wheelhouse_problems": problems}


def _install_absent(pins: dict[str, str], folder: Path, site: Path, python: str) -> dict:
    """`install` for a pip without `--report`: every carried wheel whose distribution `python` lacks."""
    listed = subprocess.run([python, "-c", "import importlib.metadata as m, json; "
                             "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"],
                            capture_output=True, text=True, check=True, timeout=120)
    have = {normalize(n) for n in json.loads(listed.stdout) if n}
    wheels = [p for p in sorted(folder.glob("*.whl")) if wheel_metadata(p)["name"] not in have]
    if wheels:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)], check=True, capture_output=True, text=True,
                       timeout=300)
    return {"installed": [p.name for p in wheels], "site": str(site), "rule": "absent (pip has no --report)",
            "wheelhouse_problems": check_wheelhouse(pins, folder)}


def check_imports(env: dict[str, str], python: str = sys.executable) -> dict:
    """Import every module the parts use (`IMPORTS`) in a fresh process with the parts' environment: the
    version of each, or the error."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n"
            "    try:\n        mod = importlib.import_module(m)\n        out[m] = getattr(mod, '__version__', 'ok')\n"
            "    except Exception as err:\n        out[m] = f'ERROR {type(err).__name__}: {err}'\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([python, "-c", code, *IMPORTS], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    return {"versions": versions, "errors": {m: v for m, v in versions.items() if str(v).startswith("ERROR")}}


# ----------------------------------------------------------------------------- the parts
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
