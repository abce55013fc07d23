"""The ranks of data-parallel distillation: started by torchrun, on this machine by the stage or on
several machines by the user.

**One machine** (`train_on_ranks`, called by the distill stage when `distill.devices` names several
devices): the stage writes the run's spec (the pipeline config, the training file, the output directory)
to `<out_dir>/launch/spec.json` and starts

    python -m alignet_core.distill.agent --standalone --nnodes 1 --nproc-per-node N --max-restarts 0 \\
        -m alignet_core.distill --spec <out_dir>/launch/spec.json

that is, torchrun in a process the kernel kills if the stage's process dies (`agent`), whose ranks die
with it in turn, so a killed parent leaves no orphan ranks. The stage stays a plain function: it waits,
reports progress from the lines rank 0 appends to `launch/progress.log`, forwards the ranks' log lines
to its logger, and turns a failed rank into an error here: the rank's own `AlignetError` (the class
and message it raised, from `launch/error-rank<r>.json`) or a `DistributedError` naming the rank and how
it ended. Training resumes from its newest checkpoint when the stage runs again.

**Several machines** (`python -m alignet_core.distill -c my.yaml`, started by torchrun on every node):
the ranks compute the stage's key and directory from the config, train into it, and rank 0 then runs
the stage, which finds the finished training, evaluates the student once and writes the manifest.

Every rank runs `train_this_rank`: it checks that torchrun started the world the config describes,
joins the process group (`hardware.process_group_backend`: NCCL between GPUs, gloo between CPUs) on
its device (`distill.devices[LOCAL_RANK]`), reads the training split and runs `train.train_student`,
whose data-parallel arithmetic is in `parallel`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from alignet_core import errors
from alignet_core.config import PipelineConfig
from alignet_core.distill.agent import AGENT_ENV, PARENT_ENV, die_with_parent
from alignet_core.distill.checkpoints import CHECKPOINT_DIR, list_checkpoints
from alignet_core.distill.parallel import RankLayout, rank_layout
from alignet_core.distill.train import train_student
from alignet_core.errors import AlignetError, ConfigError, DistributedError
from alignet_core.hardware import process_group_backend, rank_threads
from alignet_core.io import sources
from alignet_core.io.dataset_splits import join_mode, read_split
from alignet_core.models.student import read_train_log

log = logging.getLogger(__name__)

LAUNCH_DIR = "launch"
SPEC_FILE = "spec.json"
PROGRESS_FILE = "progress.log"
POLL_SECONDS = 0.2


# ----------------------------------------------------------------------------- every rank
def rank_device(layout: RankLayout) -> torch.device:
    """This rank's device, `layout.devices[LOCAL_RANK]`, after checking that torchrun started the world
    the config describes (WORLD_SIZE = nodes × devices, LOCAL_WORLD_SIZE = devices); `ConfigError`
    naming distill.devices / distill.nodes and the torchrun options that fit otherwise."""
    try:
        world, local, local_world = (int(os.environ[k]) for k in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    except KeyError as err:
        raise ConfigError(f"distill.devices: {err.args[0]} is not set; the ranks are started by torchrun "
                          "(python -m alignet_core.distill is one rank)") from None
    if world != layout.ranks or local_world != len(layout.devices):
        raise ConfigError(
            f"distill.devices / distill.nodes: torchrun started {world} ranks, {local_world} per node, but the "
            f"config asks for {layout.nodes} node(s) × {len(layout.devices)} devices = {layout.ranks} ranks; "
            f"start torchrun with --nnodes {layout.nodes} --nproc-per-node {len(layout.devices)}"
        )
    return layout.devices[local]


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The default torch.distributed process group (env:// rendezvous, as torchrun sets it up) for the
    block, on `device` (NCCL for a GPU, gloo for the CPU); destroyed after."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=process_group_backend(device),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_this_rank(
    cfg: PipelineConfig, train_url: str, out_dir: str, progress: Callable[[int, float], None] | None = None
) -> dict[str, Any]:
    """One rank's part of the run: join the process group torchrun set up and train (`train_student`)
    on the split at `train_url` (joined to `cfg.source` per `distill.join`) into `out_dir`. Returns the
    run's log. Raises `ConfigError` before any work when torchrun's world does not match the config."""
    die_with_parent(os.environ.get(AGENT_ENV))  # an orphaned rank (its agent killed) ends at once
    layout = rank_layout(cfg)
    device = rank_device(layout)
    with process_group(device):
        src = sources.source_from_config(cfg.source)
        train = read_split(train_url, src, join_mode(cfg.distill.dataset, cfg.distill.join))
        return train_student(train, src, cfg.distill, out_dir, device, cfg.seed, progress)


def write_rank_error(launch_dir: str, rank: int, err: AlignetError) -> None:
    """Record a rank's `AlignetError` (class name and message) for the launcher to raise again."""
    path = Path(launch_dir) / f"error-rank{rank}.json"
    path.write_text(json.dumps({"rank": rank, "type": type(err).__name__, "message": str(err)}))


class ProgressWriter:
    """Rank 0's progress lines, `<step> <loss>`, appended to a file the launcher reads as they come."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a")  # noqa: SIM115 — closed with the process

    def __call__(self, step: int, loss: float) -> None:
        self._file.write(f"{step} {loss!r}\n")
        self._file.flush()


# ----------------------------------------------------------------------------- the launcher (parent)
def torchrun_command(layout: RankLayout, spec_path: str) -> list[str]:
    """The command that starts the ranks of a one-machine run: torchrun (in `agent`) with one process per
    device, no restarts (a failed run resumes when the stage runs again), each rank
    `python -m alignet_core.distill --spec <spec_path>`."""
    return [sys.executable, "-m", "alignet_core.distill.agent", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(len(layout.devices)), "--max-restarts", "0",
            "-m", "alignet_core.distill", "--spec", spec_path]


def nodes_need_torchrun(layout: RankLayout) -> ConfigError:
    """The error for a multi-node run the stage was asked to train: such ranks are started by torchrun."""
    return ConfigError(
        f"distill.nodes: {layout.nodes} machines train together only when torchrun starts the ranks on every "
        f"node: torchrun --nnodes {layout.nodes} --nproc-per-node {len(layout.devices)} --rdzv-backend c10d "
        "--rdzv-endpoint <host>:29500 -m alignet_core.distill -c <config> (docs/scaling.md); "
        "the stage then evaluates the finished run"
    )


def _rank_env(layout: RankLayout) -> dict[str, str]:
    """The ranks' environment: this one, this process as the agent's parent, this package first on the
    path (the ranks run the parent's code), and the CPU threads per rank (`hardware.rank_threads`) unless
    OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    threads = rank_threads(layout.devices[0], len(layout.devices))
    if threads is not None and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _root_cause(lines: list[str]) -> str | None:
    """'rank R exited with code C' from torchrun's failure summary, if it printed one."""
    text = "\n".join(lines)
    rank = re.findall(r"rank\s*:\s*(\d+)", text)
    code = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    if not rank or not code:
        return None
    how = f"was killed by signal {-int(code[-1])}" if int(code[-1]) < 0 else f"exited with code {code[-1]}"
    return f"rank {rank[-1]} {how}"


def _forward(stream: Any, tail: deque[str]) -> None:
    """Forward the ranks' stderr to this logger line by line, keeping the last lines for an error."""
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        tail.append(line)
        log.info("ranks: %s", line)


def train_on_ranks(
    cfg: PipelineConfig,
    train_url: str,
    out_dir: str,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train with one rank per device of `distill.devices` on this machine, under torchrun, and return
    the run's log (`train_student`'s). `progress(step, loss)` is called here for every step rank 0
    reports. A rank that fails raises here (its own error class, or `DistributedError`); the run then
    resumes from its newest checkpoint when called again. `distill.nodes` above 1 is a `ConfigError`: such
    runs are started by torchrun on every node (module docstring)."""
    layout = rank_layout(cfg)
    done = read_train_log(out_dir)
    if done is not None:  # finished earlier (by this launcher, or by torchrun on every node)
        return done
    if layout.nodes > 1:
        raise nodes_need_torchrun(layout)
    if torch.cuda.is_initialized():  # what this process cached on the GPUs (the evaluation before) goes back to them
        torch.cuda.empty_cache()
    launch_dir = os.path.join(out_dir, LAUNCH_DIR)
    os.makedirs(launch_dir, exist_ok=True)
    for name in os.listdir(launch_dir):  # the last attempt's progress and errors
        if name == PROGRESS_FILE or name.startswith("error-rank"):
            os.remove(os.path.join(launch_dir, name))
    spec_path = os.path.join(launch_dir, SPEC_FILE)
    spec = {"config": cfg.model_dump(mode="json"), "train": train_url, "out_dir": out_dir,
            "launch_dir": launch_dir, "progress": os.path.join(launch_dir, PROGRESS_FILE)}
    tmp = f"{spec_path}.tmp"
    Path(tmp).write_text(json.dumps(spec, indent=2))
    os.replace(tmp, spec_path)
    Path(spec["progress"]).touch()

    command = torchrun_command(layout, spec_path)
    log.info("distill: %d ranks on %s: %s", layout.ranks, [str(d) for d in layout.devices], " ".join(command))
    tail: deque[str] = deque(maxlen=200)
    proc = subprocess.Popen(command, env=_rank_env(layout), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    reader = threading.Thread(target=_forward, args=(proc.stderr, tail), daemon=True)
    reader.start()
    seen, partial = 0, ""
    try:
        with open(spec["progress"]) as lines:
            while True:
                finished = proc.poll() is not None
                partial += lines.read()
                *complete, partial = partial.split("\n")  # a line still being written waits for its end
                for line in complete:
                    step, loss = line.split()
                    seen = int(step)
                    if progress is not None:
                        progress(seen, float(loss))
                if finished:
                    break
                time.sleep(POLL_SECONDS)
    finally:
        if proc.poll() is None:  # this process is leaving (an error, an interrupt): stop the ranks
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise _rank_failure(launch_dir, out_dir, proc.returncode, list(tail), seen)
    done = read_train_log(out_dir)
    if done is None:
        raise DistributedError(f"distill.devices: the ranks exited without error but {out_dir!r} holds no "
                               f"finished run; last output: {list(tail)[-5:]}")
    return done


def _rank_failure(launch_dir: str, out_dir: str, code: int, tail: list[str], step: int) -> AlignetError:
    """The error a failed launch raises: the lowest rank's own `AlignetError` if one was recorded, else a
    `DistributedError` saying which rank ended how, the last step reported and the checkpoint to resume."""
    recorded = sorted(Path(launch_dir).glob("error-rank*.json"), key=lambda p: int(p.stem.removeprefix("error-rank")))
    if recorded:
        err = json.loads(recorded[0].read_text())
        kind = getattr(errors, err["type"], None)
        if isinstance(kind, type) and issubclass(kind, AlignetError):
            return kind(err["message"])
    ckpts = list_checkpoints(os.path.join(out_dir, CHECKPOINT_DIR))
    resume = f"resumes from the checkpoint at step {ckpts[-1][0]}" if ckpts else "starts again from step 0"
    cause = _root_cause(tail) or f"torchrun exited with code {code}"
    return DistributedError(
        f"distill.devices: a training rank failed ({cause}) after step {step}; the run {resume} when the stage "
        f"runs again. Last lines of the ranks' output: {tail[-3:]}"
    )
