"""Data-parallel distillation: which rank computes which micro-batches of a step, and the few collectives
a step needs (`torch.distributed`: DDP's gradient all-reduce, one loss all-reduce, broadcasts from rank 0).

The global batch is the config's: optimizer step s trains on the `batch_triplets` triplets that
`TripletBatches.step_triplets(s)` gives whatever the number of ranks. With N ranks and `grad_accum` G, the
step is cut into N·G equal micro-batches (items s·N·G + j of `TripletBatches(grad_accum=N·G)`) and rank r
computes micro-batches j = r·G … r·G + G − 1: a disjoint, seeded shard of the step's triplets. Each rank
backpropagates loss_j / G; DDP averages the gradients over the N ranks, so every rank holds
Σ_j ∇loss_j / (N·G), the gradient of the mean loss over the global batch — the arithmetic of one process
with grad_accum N·G, which is the mean over the same triplets as one process with grad_accum G. Every rank
then takes the same optimizer step (Adam, decay to the initial weights, the warm-up + cosine learning rate
of step s) on the same gradients, so the ranks' weights stay identical and the run follows the
one-process trajectory up to the order in which the gradient sums are reduced.

No BatchNorm statistics are synchronised because none are computed: the student's backbone always runs
in eval mode (`student.TripletStudent.train`), so its running statistics stay the pretrained ones on
every rank. The student's unused parameters (the backbone's own classifier: the student reads its pooled
pre-logits) get no gradient; DDP is told to expect them (`find_unused_parameters`), and the optimizer
treats a missing gradient as zero, as in one process.

`rank_layout` turns `distill.devices` / `distill.nodes` into the ranks' devices and refuses, before any
work, a layout whose micro-batches would not cut the batch evenly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import torch
from torch import nn

from alignet_core.config import PipelineConfig
from alignet_core.distill.micro_batches import check_micro_batches
from alignet_core.errors import AlignetError
from alignet_core.hardware import resolve_device, resolve_devices

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training ranks: `rank` of `size` (0 of 1 without torch.distributed)."""

    rank: int
    size: int

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes every file of the run (checkpoints, exports, the log); the others only read."""
        return self.rank == 0


def current_world() -> World:
    """The default process group's rank and size when one is initialised, else rank 0 of 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


@dataclass(frozen=True)
class RankLayout:
    """Where the ranks of a run train: `devices[i]` for local rank i on each of `nodes` machines."""

    devices: tuple[torch.device, ...]
    nodes: int

    @property
    def ranks(self) -> int:
        """The world size: nodes × devices per node."""
        return self.nodes * len(self.devices)


def rank_layout(cfg: PipelineConfig) -> RankLayout:
    """The ranks of `cfg`'s distillation, checked before any work.

    `distill.devices` (one rank per entry; null: one process on the pipeline's `device`) times
    `distill.nodes`. `ConfigError` naming the field for devices that do not exist here (a GPU index beyond
    those torch sees, CUDA without a GPU; strings are checked when the config loads) and for a rank count
    whose N·grad_accum micro-batches do not cut `distill.batch_triplets` into equal shares."""
    d = cfg.distill
    devices = resolve_devices(d.devices, "distill.devices") if d.devices else [resolve_device(cfg.device)]
    devices = [torch.device("cuda", 0) if x.type == "cuda" and x.index is None else x for x in devices]
    layout = RankLayout(tuple(devices), d.nodes)
    check_micro_batches(d.batch_triplets, d.grad_accum, layout.ranks, d.nodes)
    return layout


class RankMicroBatches(Sequence[int]):
    """The micro-batches (items of `TripletBatches(grad_accum=ranks·grad_accum)`) that rank `rank` of
    `ranks` computes for optimizer steps [start, stop), in order: for step s, items
    s·ranks·grad_accum + rank·grad_accum + i, i < grad_accum. A lazy sequence (a DataLoader sampler)."""

    def __init__(self, start: int, stop: int, grad_accum: int, rank: int, ranks: int) -> None:
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} of {ranks}")
        self.start, self.stop, self.grad_accum, self.rank, self.ranks = start, max(start, stop), grad_accum, rank, ranks

    def __len__(self) -> int:
        return (self.stop - self.start) * self.grad_accum

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...

    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, j = divmod(i, self.grad_accum)
        return (self.start + step) * self.ranks * self.grad_accum + self.rank * self.grad_accum + j


def data_parallel(student: nn.Module, device: torch.device, world: World) -> nn.Module:
    """`student` wrapped in DDP when there are several ranks (gradients averaged over the ranks in
    backward), else itself. Buffers are not re-broadcast every forward (the backbone's BatchNorm runs in
    eval mode: its statistics never change); unused parameters (the backbone's classifier) are expected."""
    if world.size == 1:
        return student
    ddp = nn.parallel.DistributedDataParallel
    # torch ≥ 2.13 calls it forward_sync_buffers (broadcast_buffers is deprecated there)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
               **no_buffer_sync)


def accumulating(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    """The context of one micro-batch's backward: DDP's `no_sync` (gradients kept local) for all but the
    step's last micro-batch, whose backward all-reduces the accumulated gradients once."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-rank float over the ranks (float64 all-reduce); `value` itself for one rank."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def from_writer(make: Callable[[], T], world: World) -> T:
    """`make()` evaluated on rank 0 and the result (or the `AlignetError` it raised) sent to every rank:
    decisions about files (a finished run? which checkpoint to resume?) are taken once, by the rank that
    writes them, so that every rank acts on the same answer and an error stops every rank alike."""
    if world.size == 1:
        return make()
    import torch.distributed as dist

    box: list[Any] = [None]
    if world.is_writer:
        try:
            box[0] = ("ok", make())
        except AlignetError as err:
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def barrier(world: World) -> None:
    """Wait until every rank reaches this point (nothing with one rank)."""
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
