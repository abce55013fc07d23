"""The demo's people figures under the variants its settings were chosen from (issue 31): 120 vs 360
distillation steps, the transform with and without a hyper-parameter search, and the teacher at 260 px
(Lite2's pretrained size) and 128 px (`embed.image_size`), and 180 distillation steps at twice the learning rate; the demo's setting under seeds 1–4;
and only the student's last N blocks training (`distill.train_blocks`) at several step counts, under seeds 0–4.

    python -m benchmarks.demo_variants --root /tmp/demo-variants          # runs them (about 25 min on 2 cores)
    python -m benchmarks.demo_variants --root /tmp/demo-variants --only teacher_128   # some of them
    python -m benchmarks.demo_variants --collect steps_120=<alignment.json> ...   # only reads finished outputs

Each variant is `alignet run -c alignet_core/data/demo.yaml` with `--set` overrides on one root, so the
stages the variants share are computed once. From every run it keeps the evaluate stage's expected accuracy
on the test fold (`expected`, `expected_changes` in alignment.json) and the transform's pooled expected
accuracy over every fold (`expected` in the transform's manifest), and the stages' seconds. Results:
results/demo_variants.json; the variants run or collected replace their entries there, the others stay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks._machine import RESULTS, machine_info, write_result

DEMO = Path(__file__).resolve().parents[1] / "alignet_core" / "data" / "demo.yaml"
VARIANTS: dict[str, list[str]] = {
    "steps_120": ["distill.steps=120", "distill.checkpoint_every=40"],
    "steps_360": [],  # the demo's setting
    "search": ["transform.search_lams=[0.1,1.0,10.0]", "transform.search_lrs=[0.003,0.01,0.03]"],
    "teacher_260": ["embed.image_size=260"],  # Lite2's pretrained size (the demo's teacher before image_size)
    "teacher_128": ["embed.image_size=128"],
    "steps_180_lr6e-4": ["embed.image_size=260", "distill.steps=180", "distill.lr=6e-4", "distill.checkpoint_every=60"],
    # the demo's setting under other seeds (every fit's: VICE, folds' draws, transform, sampling, student): how much
    # of a figure is the draw (steps_360 is seed 0)
    **{f"seed_{k}": [f"seed={k}"] for k in range(1, 5)},
    # twice the distillation steps (the student's accuracy against the teacher on its validation triplets was
    # still rising at 360), under seeds 0-2
    **{f"steps_720{'' if k == 0 else f'_seed_{k}'}": [f"seed={k}", "distill.steps=720"] for k in range(3)},
    # only the student's last N blocks, its head layers and the triplet head train (`distill.train_blocks`; a step
    # costs the trained part only, so more steps in the same time), under seeds 0-4
    **{f"blocks_{n}_steps_{s}{'' if k == 0 else f'_seed_{k}'}": [f"seed={k}", f"distill.train_blocks={n}",
                                                                 f"distill.steps={s}"]
       for n, s in ((4, 1440), (0, 1440), (8, 720), (4, 360), (2, 2880), (4, 1080)) for k in range(5)},
    # the last 4 blocks at twice the batch for half the steps (the same triplets seen)
    **{f"blocks_4_batch_32_steps_720{'' if k == 0 else f'_seed_{k}'}": [
        f"seed={k}", "distill.train_blocks=4", "distill.batch_triplets=32", "distill.steps=720"] for k in range(5)},
}


def _est(e: dict[str, Any]) -> list[float]:
    return [round(e["value"], 4), round(e["low"], 4), round(e["high"], 4)]


def from_alignment(path: Path) -> dict[str, Any]:
    """The test fold's people figures of one evaluate output."""
    m = json.loads(path.read_text())
    return {"expected": {model: _est(v["human_expected"]) for model, v in m["expected"].items()},
            "expected_changes": {side: _est(v["human_expected"]) for side, v in m["expected_changes"].items()},
            "alignment_json": str(path)}


def from_transform(path: Path) -> dict[str, Any]:
    """The transform's pooled people figures and chosen settings, from its stage manifest."""
    m = json.loads(path.read_text())["metrics"]
    e = m["expected"]
    return {"pooled_expected": {"zero_shot": _est(e["zero_shot"]), "transformed": _est(e["transformed"]),
                                "gain": _est(e["gain"]), "ceiling": round(e["ceiling"], 4)},
            "hyperparameters": m["hyperparameters"], "search_best": (m.get("search") or {}).get("best"),
            "search_scores": [{k: r[k] for k in ("alpha", "lam", "lr", "transformed_mean")}
                              for r in (m.get("search") or {}).get("settings", [])],
            "manifest": str(path)}


def from_summary(path: Path) -> dict[str, Any]:
    """The student's triplet accuracy against the teacher on its validation triplets, before and after."""
    s = json.loads(path.read_text())
    return {"student_acc_vs_teacher": [s["student_acc_before"], s["student_acc_after"]],
            "stage_seconds": s.get("stage_seconds"), "summary_json": str(path)}


def _commit() -> str:
    """The code the variant ran (a variant run before another change keeps its own)."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=DEMO.parents[2])
    return git.stdout.strip() or "unknown"


def run(root: Path, only: list[str]) -> dict[str, Any]:
    out = {}
    for name in only or list(VARIANTS):
        sets = VARIANTS[name]
        cmd = [str(Path(sys.executable).parent / "alignet"), "run", "-c", str(DEMO), "--root", str(root),
               *[a for s in sets for a in ("--set", s)]]
        subprocess.run(cmd, check=True)
        summaries = sorted((root / "reports" / "demo").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
        s = json.loads(summaries[-1].read_text())
        evaluate = Path(s["report_dir"]).parents[2] / "stages" / "evaluate" / s["stage_keys"]["evaluate"]
        transform = Path(s["report_dir"]).parents[2] / "stages" / "transform" / s["stage_keys"]["transform"]
        out[name] = {"overrides": sets, "commit": _commit(), **from_alignment(evaluate / "alignment.json"),
                     **from_summary(summaries[-1]),
                     **from_transform(transform / "manifest.json")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="artifact root to run the variants on")
    ap.add_argument("--collect", nargs="*", default=[], metavar="NAME=FILE",
                    help="read a finished alignment.json, transform manifest.json or summary.json for variant NAME")
    ap.add_argument("--only", nargs="*", default=[], choices=list(VARIANTS), help="run these variants only")
    args = ap.parse_args()
    if args.root is not None:
        variants = run(args.root, args.only)
    else:
        variants: dict[str, Any] = {}
        for item in args.collect:
            name, _, file = item.partition("=")
            path = Path(file)
            read = {"manifest.json": from_transform, "summary.json": from_summary}.get(path.name, from_alignment)
            part = read(path)
            variants.setdefault(name, {"overrides": VARIANTS.get(name.split(":")[0], [])}).update(part)
    previous = RESULTS / "demo_variants.json"
    kept = json.loads(previous.read_text()).get("variants", {}) if previous.exists() else {}
    write_result("demo_variants", {"benchmark": "demo_variants", "config": str(DEMO),
                                   "variants": {**kept, **variants}, "machine": machine_info()})


if __name__ == "__main__":
    main()
