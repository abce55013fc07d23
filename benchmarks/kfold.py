"""The transform stage's k-fold rotation at THINGS scale: 4.7M human-like triplets over 1,854 objects.

`python -m benchmarks.kfold` generates (once, in `--work`) imported embeddings with a known structure and
a THINGS-sized triplet file with the human-like rule's choice probabilities (`benchmarks.scale_data`: the
objects are images of generating groups, human choices weigh superordinate categories more than the
teacher does), then runs the real stage (`run_transform`: import → k folds + the refit on all) in a child
process and records, in `benchmarks/results/kfold.json`:

- the share of the triplets each fold trains on (pooled over the folds; at k = 5 a fixed file gives
  ((k−1)/k)³ = 51.2% per fold before the early-stopping split, which `transform.val_max_triplets` caps at
  20,000 rows), how many train at least one fold, how many are test rows (each scored once) and partial;
- that the held-out figures cover every object once (their objects = 1,854);
- the pooled held-out figures and each fold's, the refit's epochs;
- wall time of the stage and of the import before it, and the child's peak resident memory
  (`ru_maxrss`: the process that reads the file and fits, nothing else in it).

Few epochs (`--epochs`, default 2) and a small feature width (`--dim`, default 128; the transform's cost
per step grows as dim²) keep it to minutes on a CPU: it measures the rotation's data handling, memory and
the per-epoch cost, not a converged fit. The targets are the file's probabilities ("given by the user").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._machine import RESULTS, machine_info
from benchmarks.scale_data import ScaleSpec, group_labels, human_latent, image_id, object_images, write_embeddings

THINGS_TRIPLETS = 4_700_000
CHUNK = 500_000


def write_human_chunked(spec: ScaleSpec, folder: Path, labels: np.ndarray) -> dict[str, Path]:
    """`scale_data.write_human`'s rule in chunks of rows (its one-shot version needs (t, dim) arrays):
    `triplets.npy` (t, 3) int64 (chosen pair first, odd one last), `probabilities.npy` (t, 3) float32 and
    the `objects.csv` table."""
    paths = {"triplets": folder / "triplets.npy", "probabilities": folder / "probabilities.npy",
             "objects": folder / "objects.csv"}
    imgs = object_images(spec, labels)
    paths["objects"].write_text("object,image_id\n" + "".join(f"{o},{image_id(i)}\n" for o, row in
                                                              enumerate(imgs.tolist()) for i in row))
    h = human_latent(spec)
    gram = spec.human_beta * (h @ h.T).astype(np.float64)  # (m, m): the rule's scaled cosine similarities
    rng = np.random.default_rng([spec.seed, 2])
    trip = np.lib.format.open_memmap(paths["triplets"], mode="w+", dtype=np.int64, shape=(spec.n_triplets, 3))
    prob = np.lib.format.open_memmap(paths["probabilities"], mode="w+", dtype=np.float32, shape=(spec.n_triplets, 3))
    order_of = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])
    pair_of = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    done = 0
    while done < spec.n_triplets:
        draw = rng.integers(0, spec.n_objects, (CHUNK, 3), dtype=np.int64)
        t = draw[(draw[:, 0] != draw[:, 1]) & (draw[:, 0] != draw[:, 2]) & (draw[:, 1] != draw[:, 2])]
        t = t[: spec.n_triplets - done]
        sims = np.stack([gram[t[:, 0], t[:, 1]], gram[t[:, 0], t[:, 2]], gram[t[:, 1], t[:, 2]]], axis=1)
        p = np.exp(sims - sims.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        choice = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(1).clip(0, 2)
        trip[done:done + len(t)] = np.take_along_axis(t, order_of[choice], 1)
        prob[done:done + len(t)] = np.take_along_axis(p, pair_of[choice], 1)
        done += len(t)
    trip.flush()
    prob.flush()
    return paths


def stage_config(data: dict[str, Path], human: dict[str, Path], root: Path, epochs: int) -> dict[str, Any]:
    return {
        "root": str(root), "seed": 0, "device": "cpu",
        "source": {"kind": "embeddings", "path": str(data["embeddings"]), "format": "auto",
                   "ids": str(data["ids"]), "labels": str(data["labels"])},
        "human": {"triplets": str(human["triplets"]), "probabilities": str(human["probabilities"]),
                  "objects": str(human["objects"]), "folds": 5},
        "transform": {"enabled": True, "targets": "soft", "epochs": epochs, "batch_size": 4096},
    }


def run_stage(cfg_path: str) -> None:
    """The child: import the embeddings, run the transform stage, print one JSON line."""
    import torch

    from alignet_core.config import parse_config
    from alignet_core.context import RunContext
    from alignet_core.embed.stage import run_embed
    from alignet_core.transform.stage import run_transform

    torch.set_num_threads(int(os.environ.get("KFOLD_THREADS", "2")))
    cfg = parse_config(json.loads(Path(cfg_path).read_text()))
    t0 = time.perf_counter()
    emb = run_embed(RunContext.of(cfg))
    t1 = time.perf_counter()
    ctx = RunContext.of(cfg)
    human = ctx.human  # read the file and split it (timed with the stage)
    out = run_transform(ctx, emb)
    t2 = time.perf_counter()
    m = out.metrics
    h = m.heldout
    print(json.dumps({
        "import_seconds": round(t1 - t0, 1), "transform_seconds": round(t2 - t1, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "n_objects": human.n_objects if human is not None else None,
        "rotation": m.rotation.model_dump(), "heldout_objects": h.n_objects,
        "heldout": {"zero_shot": h.zero_shot.model_dump(), "transformed": h.transformed.model_dump(),
                    "gain": h.gain.model_dump()},
        "folds": [f.model_dump() for f in m.folds],
        "partial": None if m.partial is None else m.partial.model_dump(),
        "refit": m.refit.model_dump(), "teacher": m.teacher, "soft_targets": m.soft_targets,
        "stage_seconds_recorded": m.seconds,
    }))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/alignet_kfold_bench")
    ap.add_argument("--n-triplets", type=int, default=THINGS_TRIPLETS)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "kfold.json"))
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_stage:
        run_stage(args.run_stage)
        return
    work = Path(args.work)
    data_dir = work / f"data_{args.n_triplets}_{args.dim}"
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = ScaleSpec(n=32768, dim=args.dim, n_triplets=args.n_triplets)
    t0 = time.perf_counter()
    data = write_embeddings(spec, data_dir)
    human = write_human_chunked(spec, data_dir, group_labels(spec))
    gen_s = time.perf_counter() - t0
    root = work / f"root_{time.time_ns()}"
    cfg_path = work / "stage_config.json"
    cfg_path.write_text(json.dumps(stage_config(data, human, root, args.epochs)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kfold", "--run-stage", str(cfg_path)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the stage failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    r = res["rotation"]
    result = {
        "benchmark": "kfold",
        "machine": machine_info(),
        "data": {"n_triplets": args.n_triplets, "n_objects": spec.n_objects, "images": spec.n, "dim": args.dim,
                 "images_per_object": spec.images_per_object, "generator": "benchmarks.scale_data's human-like rule",
                 "generate_seconds": round(gen_s, 1)},
        "settings": {"folds": 5, "epochs": args.epochs, "batch_size": 4096, "targets": "soft (the file's probabilities)",
                     "note": "few epochs: measures the rotation's data handling, memory and per-epoch cost, not a "
                             "converged fit"},
        "claims": {
            "train_share_per_fold": r["train_share"],
            "train_share_at_least_0.5": r["train_share"] >= 0.5,
            "heldout_covers_every_object_once": res["heldout_objects"] == spec.n_objects,
            "peak_rss_at_most_8_gib": res["peak_rss_gib"] <= 8.0,
        },
        **res,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("claims", "transform_seconds", "peak_rss_gib")}, indent=2))


if __name__ == "__main__":
    main()
