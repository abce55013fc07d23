"""Incremental embedding: a regeneration after 1% of a folder changed vs a full extraction (issue 35).

    python -m benchmarks.incremental            # the 1,906 demo emoji, tf_efficientnet_lite0 (packaged), 1% changed

A folder of the demo emoji (class folders by category) is embedded by the embed stage (`run_embed`, a
fresh run context each time, as a run does: listing, key, reuse or work). Then `--changed` of its images
get new bytes (another emoji copied over them, a later mtime) and the stage runs again on the same root:
it finds the previous store of its lineage, copies every unchanged row and embeds only the changed
images (`incremental_s`). The same changed folder is then embedded from scratch under another root
(`full_s`, nothing to reuse). `ratio` = full_s / incremental_s, both measured in this run, both with the
model's build and the listing included; `max_abs_diff` compares the two stores row by row (the same
images, so it must be ~0: a speed-up never comes from computing something else). Also recorded: the
first extraction (`first_s`) and the change counts the stage reported.
Writes `benchmarks/results/incremental.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._machine import machine_info, write_result


def _rows(url: str) -> dict[str, np.ndarray]:
    import zarr

    g = zarr.open_group(url, mode="r")
    ids = [str(i) for i in np.asarray(g["ids"][:]).tolist()]
    emb = np.asarray(g["embeddings"][:], dtype=np.float32)
    return {i: emb[r] for r, i in enumerate(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=0, help="0: every demo emoji (1,906)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the images given new bytes")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="packaged")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from alignet_core.config import parse_config
    from alignet_core.context import RunContext
    from alignet_core.embed.stage import run_embed
    from alignet_core.io.sources import demo_source

    records = demo_source().records
    if args.images:
        records = records[:: max(1, len(records) // args.images)][: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="incremental-"))
    try:
        folder = tmp / "images"
        for rec in records:
            (folder / rec.label).mkdir(parents=True, exist_ok=True)
            shutil.copy(rec.path, folder / rec.label / Path(rec.path).name)

        def cfg(root: str):
            return parse_config({"root": str(tmp / root), "device": "cpu", "source": {"kind": "folder",
                                 "path": str(folder)}, "embed": {"model": args.model, "weights": args.weights,
                                 "batch_size": args.batch_size, "chunk_rows": 4 * args.batch_size,
                                 "num_workers": args.num_workers}})

        def timed(root: str):
            t0 = time.perf_counter()
            out = run_embed(RunContext.of(cfg(root)))
            return out, time.perf_counter() - t0

        first, first_s = timed("root")
        files = sorted(folder.rglob("*.png"))
        rng = np.random.default_rng(0)
        k = max(1, round(args.changed * len(files)))
        picked = rng.choice(len(files), size=k, replace=False)
        for j in picked.tolist():
            path, other = files[j], files[(j + 1) % len(files)]
            before = path.stat().st_mtime_ns
            shutil.copy(other, path)
            os.utime(path, ns=(before + 10**9, before + 10**9))
        inc, incremental_s = timed("root")
        full, full_s = timed("root-full")
        a, b = _rows(inc.artifact), _rows(full.artifact)
        assert list(a) == list(b)
        diff = max(float(np.abs(a[i] - b[i]).max()) for i in a)
        c = inc.metrics.changes
        load = os.getloadavg()[0]
        result = {
            "benchmark": "incremental", "model": args.model, "weights": args.weights, "images": len(files),
            "changed": k, "batch_size": args.batch_size, "num_workers": args.num_workers,
            "first_s": round(first_s, 2), "incremental_s": round(incremental_s, 2), "full_s": round(full_s, 2),
            "ratio": round(full_s / incremental_s, 2),
            "reported": {"added": c.added, "changed": c.changed, "removed": c.removed, "reused": c.reused,
                         "listing_seconds": c.listing_seconds},
            "max_abs_diff": diff, "keys_equal": inc.key == full.key,
            "machine": machine_info(),
        }
        if load > (os.cpu_count() or 1) / 2:
            result["note"] = ("load average above half the cores during the run: other tenants shared the CPU, "
                              "absolute times are high, the ratio (both measured in this run) is what counts")
        if args.no_write:
            print(result)
        else:
            write_result("incremental", result)
        assert first.key != inc.key
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
