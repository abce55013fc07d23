"""Run the pipeline's stages up to one stage, in this process or as a script that a test kills.

    python -m tests.reliability.stage_runner CONFIG_JSON STAGE [--pace MODULE:ATTR SECONDS]

Upstream stages whose manifests are complete are reused (`alignet_core.runtime.runner`). With `--pace`, the
function `MODULE:ATTR` (`ATTR` may be `Class.method`) prints `paced <i>` after its i-th call and
then sleeps SECONDS: a pause standing in for more real work per unit, so that a test can SIGKILL
the process at a random point after real work started instead of racing a run that ends in a
blink. Nothing else about the stage changes.

Both the killed process and the test run with one torch thread, so a stage gives the same bits in
either.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
from typing import Any

from alignet_core.context import RunContext

os.environ.setdefault("TQDM_DISABLE", "1")

STAGES = ("embed", "transform", "cluster", "sample")


def run_until(cfg: Any, stage: str) -> Any:
    """Run (or reuse) every stage up to and including `stage`; return that stage's `StageOutput`."""
    from alignet_core.cluster.stage import run_cluster
    from alignet_core.embed.stage import run_embed
    from alignet_core.sample.stage import plan_sample, publish_sample, run_sample_shard
    from alignet_core.transform.stage import run_transform

    ctx = RunContext.of(cfg)
    emb = run_embed(ctx)
    if stage == "embed":
        return emb
    tfm = run_transform(ctx, emb)
    if stage == "transform":
        return tfm
    clu = run_cluster(ctx, tfm)
    if stage == "cluster":
        return clu
    sp = plan_sample(ctx, tfm, clu)
    for spec in sp.specs:
        run_sample_shard(sp, spec)
    return publish_sample(ctx, sp)


def paced_shard(sp: Any, spec: dict[str, Any], seconds: float) -> str:
    """One sampling shard on a Dask worker, then a pause (see the module doc)."""
    from alignet_core.sample.stage import run_sample_shard

    out = run_sample_shard(sp, spec)
    time.sleep(seconds)
    return out


def _pace(target: str, seconds: float) -> None:
    module_name, _, attr = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def paced(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls[0] += 1
        print(f"paced {calls[0]}", flush=True)
        time.sleep(seconds)
        return out

    setattr(owner, name, paced)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--pace", nargs=2, metavar=("TARGET", "SECONDS"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from alignet_core.config import parse_config

    cfg = parse_config(json.loads(args.config))
    if args.pace:
        _pace(args.pace[0], float(args.pace[1]))
    print("started", flush=True)
    out = run_until(cfg, args.stage)
    print(f"done {out.key}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
