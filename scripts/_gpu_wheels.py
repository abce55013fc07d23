"""The GPU check's wheelhouse (scripts/gpu_check.py): the Python 3.12 wheels that the GPU machine's image lacks.

`scripts/gpu_wheels.txt` pins them (`read_manifest`); `make gpu-wheels` downloads them into `.gpu-wheels/`
(`build_wheelhouse`); `check_wheelhouse` and `resolve_offline` say whether a wheelhouse fits the pins, the
target Python and platform, and the image; on the GPU machine `install` puts into `.gpu-site/`, offline,
the carried wheels the machine lacks, and `check_imports` imports what the parts use.
"""

from __future__ import annotations

import email.parser
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "scripts" / "gpu_wheels.txt"
WHEELHOUSE = REPO / ".gpu-wheels"
SITE = REPO / ".gpu-site"
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

