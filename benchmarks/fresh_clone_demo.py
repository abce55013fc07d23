"""The README's first command from a fresh clone, timed: `git clone` of this checkout's HEAD into a new folder,
then `make install` and `make demo` there (the demo's `make install` is then a no-op), as a user runs them.

    python -m benchmarks.fresh_clone_demo [--keep]

Records the install's and the demo's wall seconds, their sum (the README's figure), the load average
before and after, the commit, the transform stage's VICE fits (`transform_densify`), and the demo's own
`summary.json` (every figure of the report, the stages' seconds) beside them in results/demo_summary.json. Run it alone on a quiet machine: the figure is a
wall time. The install reuses the package caches the machine has (uv's, pip's), as a second install does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._machine import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="fresh-clone-demo-"))
    clone = tmp / "alignet-pipeline"
    # the user's environment, less this interpreter's venv and any project settings
    ours = ("VIRTUAL_ENV", "PYTHONPATH", "PREFECT_", "MALLOC_", "ALIGNET_MALLOC")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        before = machine_info()
        install_s = _timed(["make", "install"], clone, tmp / "install.log", env)
        demo_s = _timed(["make", "demo"], clone, tmp / "demo.log", env)
        after = machine_info()
        data = clone / "alignet-data"
        summary = json.loads(next((data / "reports").rglob("summary.json")).read_text())
        transform = json.loads(next((data / "stages" / "transform").glob("*/manifest.json")).read_text())
    finally:
        if args.keep:
            print(f"clone kept: {clone}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    stages = summary.get("stage_seconds", {})
    result = {
        **summary,
        "measured": {
            "command": "git clone; make install; make demo (the demo's install step is then a no-op)",
            "commit": commit,
            "install_seconds": round(install_s, 1),
            "demo_seconds": round(demo_s, 1),
            "wall_seconds": round(install_s + demo_s, 1),
            "stage_seconds_sum": round(sum(stages.values()), 1),
            "transform_densify": transform["metrics"].get("dense"),
            "load_avg_1_5_15": before["load_avg_1_5_15"],
            "load_avg_end": after["load_avg_1_5_15"],
            "machine": before,
        },
    }
    write_result("demo_summary", result)
    return result


if __name__ == "__main__":
    main()
