"""scripts/gpu_check.py (with its modules scripts/_gpu_parts.py and scripts/_gpu_wheels.py), the prepared GPU
check: its CPU dry run runs every part's code; the wheelhouse manifest and checks; the time plan in its
header; timeouts end a part's whole process group; and the GPU parts import on an image without FAISS,
scikit-learn, Dask or Prefect."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()  # the entry point; loading it puts scripts/ on sys.path, where its modules are
import _gpu_parts as gpu_parts  # noqa: E402  the parts and how they run
import _gpu_wheels as gpu_wheels  # noqa: E402  the wheelhouse and the install


def _results_listing() -> list[str]:
    folder = REPO / "benchmarks" / "results"
    return sorted(f"{p.relative_to(folder)}:{p.stat().st_mtime_ns}" for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the dry run
@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu_and_writes_no_result(tmp_path: Path) -> None:
    """The whole check with tiny sizes on the CPU: every part ok, every benchmark's result parsed, the GPU
    tests' own code run (on the CPU), nothing written under benchmarks/results/."""
    before = _results_listing()
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--copy-to", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert _results_listing() == before
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["status"] == "ok"
    parts = report["parts"]
    assert list(parts) == ["install", "tests", "kmeans", "embed", "distill", "rehearsal"]
    assert all(p["status"] == "ok" for p in parts.values())
    assert parts["install"]["pins"] == len(gpu_wheels.read_manifest())
    counts = parts["tests"]["junit"]["counts"]
    assert counts.get("passed", 0) >= 10 and not counts.get("failed") and not counts.get("error")
    assert json.loads((out / "gpu_tests.json").read_text())["counts"] == counts
    (kmeans,) = [r["result"] for r in parts["kmeans"]["runs"]]
    assert kmeans["benchmark"] == "kmeans_gpu" and kmeans["device"] == "cpu"
    assert [r["result"]["decode"] for r in parts["embed"]["runs"]] == ["pil", "torchvision"]
    (distill,) = [r["result"] for r in parts["distill"]["runs"]]
    assert distill["benchmark"] == "distill_gpu" and distill["ours_steps_per_s"] > 0 and distill["train_flops_per_image"] > 0
    (rehearsal,) = [r["result"] for r in parts["rehearsal"]["runs"]]
    assert set(rehearsal["stages"]) == {"images", "embed", "transform", "cluster", "sample", "publish", "distill"}
    assert rehearsal["stages"]["publish"]["triplets"] > 3000
    projection = rehearsal["projection"]
    assert {"embed", "transform", "cluster", "sample", "publish", "regeneration_seconds"} <= set(projection)
    assert all("assumption" in projection[k] for k in ("embed", "transform", "cluster", "sample", "publish"))
    assert projection["so400m_embed"]["flops_ratio"] > 1
    log = (out / "gpu_check.log").read_text()
    assert "benchmarks.rehearsal" in log and "passed" in log
    for name in ("install", "tests", "kmeans", "embed", "distill", "rehearsal"):
        assert re.search(rf"^  {name} +ok ", done.stdout, re.M), done.stdout[-3000:]


@pytest.mark.slow  # the GPU tests that start worker processes (Dask, a killed distillation), on the CPU
def test_dry_run_of_every_gpu_test(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--all-tests", "--parts", "tests", "--copy-to",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:]
    tests = json.loads((tmp_path / "gpu_tests.json").read_text())["tests"]
    assert {t["outcome"] for t in tests.values()} <= {"passed", "skipped"}
    assert sum(t["outcome"] == "passed" for t in tests.values()) >= 12


# ----------------------------------------------------------------------------- the time plan
def test_header_time_plan_is_the_parts_and_fits_the_budget() -> None:
    """The table in the script's header gives each part's estimate and timeout as `parts()` has them; the
    timeouts add up to at most the 8-minute budget."""
    rows = re.findall(r"^\| (\w+) +\|.*\| +(\d+) s \| +(\d+) s \|$", gpu_check.__doc__, re.M)
    table = {name: (float(est), float(limit)) for name, est, limit in rows}
    device = gpu_parts.parts(dry_run=False, scratch=Path("/tmp"))
    assert table == {p.name: (p.estimate_s, p.timeout_s) for p in device}
    assert sum(p.timeout_s for p in device) <= 480
    assert sum(p.estimate_s for p in device) <= 0.6 * 480  # room for a rerun inside a 15-minute lease
    assert [p.name for p in gpu_parts.parts(dry_run=True, scratch=Path("/tmp"))] == [p.name for p in device]


# ----------------------------------------------------------------------------- the wheelhouse
def test_manifest_pins_fit_the_project() -> None:
    """Every pin parses, once; a pin of a direct dependency is inside pyproject's range; the install asks
    for exactly those direct dependencies."""
    pins = gpu_wheels.read_manifest()
    assert {"zarr", "numcodecs", "pydantic", "pydantic-core", "dask", "distributed", "pytest"} <= set(pins)
    assert not {"torch", "torchvision", "timm", "numpy", "faiss-cpu", "prefect"} & set(pins)  # the image has them, or unneeded
    reqs = [Requirement(r) for r in gpu_wheels.requirements(pins)]
    assert {gpu_wheels.normalize(r.name) for r in reqs} == {"zarr", "fsspec", "pydantic", "pyyaml", "safetensors",
                                                           "filelock", "dask", "pytest", "psutil"}
    for r in reqs:
        assert r.specifier.contains(pins[gpu_wheels.normalize(r.name)]), (r, pins[gpu_wheels.normalize(r.name)])


def test_manifest_rejects_ranges_and_repeats(tmp_path: Path) -> None:
    bad = tmp_path / "m.txt"
    bad.write_text("# comment\nzarr==3.1.6\npydantic>=2\n")
    with pytest.raises(ValueError, match=r"m.txt:3: expected 'name==version'"):
        gpu_wheels.read_manifest(bad)
    bad.write_text("zarr==3.1.6\nZarr==3.1.5  # again\n")
    with pytest.raises(ValueError, match="pinned twice"):
        gpu_wheels.read_manifest(bad)


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    """A minimal real wheel (METADATA, WHEEL, RECORD; one module) that pip can find and download."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}.py", "")
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_wheelhouse_check_finds_every_kind_of_problem(tmp_path: Path) -> None:
    house = tmp_path / "wheels"
    house.mkdir()
    _wheel(house, "alpha", "1.0", ["beta>=2", "numpy", 'old-backport; python_version < "3.12"', "gamma[x]; extra == 'y'"])
    _wheel(house, "beta", "2.1", [])
    pins = {"alpha": "1.0", "beta": "2.1"}
    assert gpu_wheels.check_wheelhouse(pins, house) == []  # numpy: the image; the rest: markers off for 3.12
    assert gpu_wheels.resolve_offline(pins, house).returncode == 0

    _wheel(house, "beta", "2.0", [])  # a second version
    _wheel(house, "delta", "1.0", ["epsilon"])  # not pinned, and needs what nobody provides
    _wheel(house, "zeta", "1.0", [], tag="cp312-cp312-win_amd64")
    problems = gpu_wheels.check_wheelhouse({**pins, "eta": "0.1", "zeta": "1.0"}, house)
    text = "\n".join(problems)
    assert "beta: 2 wheels" in text
    assert "delta-1.0-py3-none-any.whl: not in gpu_wheels.txt" in text
    assert "delta needs epsilon: neither carried nor in the GPU image" in text
    assert "eta==0.1: no wheel" in text
    assert "zeta-1.0-cp312-cp312-win_amd64.whl: not a wheel for CPython 3.12 on manylinux x86_64" in text
    assert "beta-2.0-py3-none-any.whl: version 2.0, gpu_wheels.txt pins 2.1" in text
    assert len(problems) == 6
    (house / "beta-2.0-py3-none-any.whl").unlink()
    _wheel(house, "beta", "1.5", [])
    (house / "beta-2.1-py3-none-any.whl").unlink()
    assert "alpha needs beta>=2; the wheelhouse has beta 1.5" in "\n".join(gpu_wheels.check_wheelhouse(pins, house))
    assert gpu_wheels.resolve_offline({"alpha": "1.0", "beta": "2.1"}, house).returncode != 0


def test_install_takes_from_the_wheelhouse_what_the_interpreter_lacks(tmp_path: Path) -> None:
    """pip resolves the wanted requirements against this interpreter's packages, offline, and the wheels it
    picks (here both: this interpreter has neither) land in the site folder, importable from there; so do
    they with the fallback for a pip without `--report`."""
    house = tmp_path / "wheels"
    house.mkdir()
    _wheel(house, "alpha-gc", "1.0", ["beta-gc>=2", "packaging"])  # packaging: this interpreter has it
    _wheel(house, "beta-gc", "2.1", [])
    pins = {"alpha-gc": "1.0", "beta-gc": "2.1"}
    for site, how in ((tmp_path / "site", gpu_wheels.install), (tmp_path / "site2", gpu_wheels._install_absent)):
        site.mkdir()  # replaced: the install starts from an empty folder
        (site / "stale.py").write_text("")
        info = how(pins, house, site, sys.executable, ["alpha-gc>=1"]) if how is gpu_wheels.install else how(
            pins, house, site, sys.executable)
        assert info["wheelhouse_problems"] == []
        assert len(info["installed"]) == 2
        assert (site / "alpha_gc.py").is_file() and (site / "beta_gc.py").is_file()
    assert not (tmp_path / "site" / "stale.py").exists()
    assert sorted(gpu_wheels.install(pins, house, tmp_path / "site", sys.executable, ["alpha-gc>=1"])["installed"]) == [
        "alpha-gc==1.0", "beta-gc==2.1"]


@pytest.mark.skipif(not any(gpu_wheels.WHEELHOUSE.glob("*.whl")), reason="no .gpu-wheels/ here (make gpu-wheels builds it)")
def test_built_wheelhouse_is_complete_small_and_resolves_offline() -> None:
    pins = gpu_wheels.read_manifest()
    assert gpu_wheels.check_wheelhouse(pins, gpu_wheels.WHEELHOUSE) == []
    assert sum(p.stat().st_size for p in gpu_wheels.WHEELHOUSE.glob("*.whl")) <= gpu_wheels.MAX_WHEELHOUSE_MB * 2**20
    done = gpu_wheels.resolve_offline(pins, gpu_wheels.WHEELHOUSE)
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------- running the parts
def test_a_timeout_kills_the_parts_whole_process_group(tmp_path: Path) -> None:
    """A part that runs over is stopped with everything it started (a loader worker, a Dask nanny)."""
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print('{{"partial": true}}', flush=True)
        time.sleep(120)
    """)
    with open(tmp_path / "log", "w") as log:
        t0 = time.perf_counter()
        run = gpu_parts.run_command(["-c", code], dict(os.environ), 3, log)
    assert run["timed_out"] and run["returncode"] != 0 and time.perf_counter() - t0 < 30
    assert run["result"] == {"partial": True}
    child = int(pid_file.read_text())
    for _ in range(50):  # the kernel may take a moment to reap it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child {child} outlived the timeout")


def test_gpu_parts_import_where_faiss_sklearn_dask_and_prefect_are_missing() -> None:
    """The GPU image has no FAISS (and perhaps no scikit-learn); Dask only with the wheelhouse; never Prefect.
    Every module the parts use imports without them, k-means picks a backend, and FAISS's absence is a
    clear error only where the FAISS path is taken."""
    blocked = ("faiss", "sklearn", "dask", "distributed", "prefect", "prefect_dask")
    code = textwrap.dedent(f"""
        import sys
        for m in {blocked!r}:
            sys.modules[m] = None
        import importlib
        for m in ("alignet_core.embed.extract", "alignet_core.embed.stage", "alignet_core.cluster.stage",
                  "alignet_core.transform.stage", "alignet_core.sample.stage", "alignet_core.distill.train",
                  "benchmarks.embed", "benchmarks.kmeans", "benchmarks.distill", "benchmarks.rehearsal"):
            importlib.import_module(m)
        from alignet_core.hardware import faiss_gpu_available, kmeans_backend
        from alignet_core.cluster.kmeans import _faiss
        from alignet_core.errors import ConfigError
        assert faiss_gpu_available() is False
        print(kmeans_backend("auto"))
        try:
            _faiss()
        except ConfigError as err:
            print("refused:", err)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "KMeansBackend(library='faiss', device='cpu')" in done.stdout  # no GPU here
    assert "refused: cluster: k-means on the CPU needs FAISS, which is not installed (pip install faiss-cpu)" in done.stdout


@pytest.mark.parametrize("module", ["benchmarks.distill", "benchmarks.rehearsal"])
def test_gpu_benchmarks_refuse_without_cuda(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--gpu"] if module == "benchmarks.distill" else [])
    assert stop.value.code == 2
    assert re.search(r"torch\s+sees\s+no(ne| CUDA GPU)", capsys.readouterr().err)
