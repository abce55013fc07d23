"""Where publishing a large split goes, and what publishing two strategies on two threads saves.

    python -m benchmarks.publish_split [--quick]

One synthetic split of `--triplets` triplets (5M: one strategy's train split at the 1M scale run) over a pool
of `--pool` ids of 11 characters: the parts of `publish.assemble_dataset`'s work on it, timed one at a time
(de-duplication keys and first occurrences, the ids gathered per triplet, the official `.npz`, its sha256 and
the arrays' hash, the Zarr copy's indices and similarities, and the per-triplet ids the Zarr copy used to
hold as variable-length strings); then two such splits published one after the other and on two threads,
in alternating rounds. Writes results/publish_split.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks._machine import machine_info, write_result
from benchmarks._timing import alternating_rounds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small arrays: checks the code, not a result")
    ap.add_argument("--triplets", type=int, default=5_000_000)
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="folder for the files written (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.triplets, args.pool, args.repeats = 20_000, 5_000, 1
    result = _measure(args)
    if not args.no_write:
        write_result("publish_split_quick" if args.quick else "publish_split", result)
    return result


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import zarr

    from alignet_core.io import store
    from alignet_core.io.formats import write_alignet_npz
    from alignet_core.sample import publish
    from alignet_core.sample.distinct import first_occurrences, triplet_keys

    rng = np.random.default_rng(0)
    n, m = args.pool, args.triplets
    ids = np.array([f"img{i:08d}" for i in range(n)])
    splits = []
    for _ in range(2):
        idx = rng.integers(0, n, (m, 3))
        sims = rng.random((m, 3), dtype=np.float32)
        sims[:, 0] += 2  # s01 strictly largest, as published rows are
        splits.append((idx, sims))
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        idx, sims = splits[0]
        parts: dict[str, float] = {}

        def timed(name: str, fn: Any) -> Any:
            t0 = time.perf_counter()
            out = fn()
            parts[name] = round(time.perf_counter() - t0, 3)
            return out

        timed("dedupe keys + first occurrences", lambda: first_occurrences(triplet_keys(idx, n)))
        names = timed("ids gathered per triplet", lambda: ids[idx])
        timed("official .npz", lambda: write_alignet_npz(str(folder / "a.npz"), idx, names, sims))
        timed("sha256 of the .npz", lambda: store.file_sha256(str(folder / "a.npz")))
        timed("hash of the arrays", lambda: publish._arrays_sha256(idx, sims))
        timed("Zarr copy: indices + similarities", lambda: publish._write_zarr_split(str(folder / "z.zarr"), "s", idx, sims))
        timed("Zarr copy: the pool's ids once", lambda: publish._write_zarr_images(str(folder / "z.zarr"), ids))

        def per_triplet_strings() -> None:  # the layout before: (m, 3) variable-length strings
            g = zarr.open_group(str(folder / "old.zarr"), mode="a").create_group("s", overwrite=True)
            publish._write_rows(g, "filenames", names)
        timed("Zarr copy: ids per triplet (the earlier layout)", per_triplet_strings)

        def one(k: int) -> None:
            i, s = splits[k]
            keep = first_occurrences(triplet_keys(i, n))
            i, s = i[keep], s[keep]
            url = str(folder / f"s{k}.npz")
            write_alignet_npz(url, i, ids[i], s)
            publish._write_zarr_split(str(folder / f"s{k}.zarr"), "s", i, s)
            store.file_sha256(url)
            publish._arrays_sha256(i, s)

        def sequential() -> None:
            one(0)
            one(1)

        def threads() -> None:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(one, [0, 1]))

        seconds = alternating_rounds({"sequential": sequential, "two_threads": threads}, args.repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "benchmark": "publish_split",
        "what": "seconds of the parts of publishing one split (timed once each), and of two splits published one "
                "after the other vs on two threads (medians of alternating rounds)",
        "triplets": m, "pool": n, "id_chars": 11,
        "parts_seconds": parts,
        "two_splits_seconds": seconds,
        "threads_speedup": round(seconds["sequential"] / seconds["two_threads"], 2),
        "repeats": args.repeats,
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()
