"""`python -m alignet_core.distill`: one rank of data-parallel distillation, as torchrun starts it.

On a cluster, the same command on every node (docs/scaling.md):

    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head:29500 \\
        -m alignet_core.distill -c my.yaml --set distill.nodes=4

`my.yaml` names the devices of one node (`distill.devices`, e.g. cuda:0 … cuda:7), `distill.nodes`, a
root every node sees and `distill.dataset` (a folder of official-format files on it). Every rank trains
into the stage directory of the config's content key (`launch.train_this_rank`); rank 0 holds the stage's
writer lock meanwhile, and then runs the distill stage itself, which finds the finished training,
evaluates the student once and writes the manifest.

`--spec FILE` is how the stage starts the ranks on one machine (`launch.train_on_ranks`).

This module only reads arguments and calls `launch` (which the stage's key covers) and the stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import yaml

from alignet_core.config import PipelineConfig, load_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.errors import AlignetError
from alignet_core.runtime.malloc import STAGE_PROCESS, set_malloc_thresholds

log = logging.getLogger("alignet_core.distill")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects key=value (e.g. distill.steps=1000), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _from_spec(path: str, rank: int) -> None:
    """A rank started by the stage's launcher: train, report progress (rank 0), record an error."""
    from alignet_core.config import parse_config
    from alignet_core.distill.launch import (
        ProgressWriter,
        train_this_rank,
        write_rank_error,
    )

    with open(path) as f:
        spec = json.load(f)
    progress = ProgressWriter(spec["progress"]) if rank == 0 else None
    try:
        train_this_rank(parse_config(spec["config"]), spec["train"], spec["out_dir"], progress)
    except AlignetError as err:
        write_rank_error(spec["launch_dir"], rank, err)
        raise


def _from_config(cfg: PipelineConfig, rank: int) -> None:
    """A rank started by the user's torchrun: train into the stage's directory; rank 0 then finishes the stage."""
    from alignet_core.distill.launch import train_this_rank
    from alignet_core.distill.stage import distill_files, plan_distill, run_distill
    from alignet_core.io import lock

    files = distill_files(cfg, None)
    plan = plan_distill(cfg, files)
    every = max(1, cfg.distill.steps // 100)

    def progress(step: int, loss: float) -> None:
        if rank == 0 and (step % every == 0 or step == cfg.distill.steps):
            log.info("step %d of %d, loss %.5f", step, cfg.distill.steps, loss)

    if rank == 0:
        os.makedirs(plan.dir, exist_ok=True)
        with lock.stage_lock(plan.dir, cfg.lock_timeout):
            train_this_rank(cfg, files.train, plan.dir, progress)
        out = run_distill(RunContext.of(cfg), None)
        log.info("distill: finished %s: %s", out.dir, json.dumps(out.metrics.model_dump(exclude={"loss_curve"})))
    else:
        train_this_rank(cfg, files.train, plan.dir, progress)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m alignet_core.distill",
                                description="One rank of data-parallel distillation (started by torchrun).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--config", help="pipeline config (YAML); needs distill.dataset")
    src.add_argument("--spec", help="the run spec the stage's launcher writes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    set_malloc_thresholds(STAGE_PROCESS)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if args.spec:
        _from_spec(args.spec, rank)
        return
    cfg = load_config(args.config)
    if args.set:
        cfg = with_overrides(cfg, _overrides(args.set))
    _from_config(cfg, rank)


if __name__ == "__main__":
    main()
