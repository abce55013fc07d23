"""Stage 0, embed: the teacher's pooled pre-logits of every image → `<dir>/embeddings.zarr`.

In: the image source (`source`) and the teacher (`embed`). Out: an embedding store
(`io.embedding_store`), rows in source order. The key covers the source's identity, the embed
config except `devices` (which devices of one kind run the extraction changes no output) and the
compute identity: GPU rows are computed under bf16 autocast, CPU rows in float32, so a store made
on one is never served for the other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from alignet_core.config import PipelineConfig
from alignet_core.embed.extract import extract_embeddings
from alignet_core.hardware import ComputeIdentity, compute_identity, resolve_device, resolve_devices
from alignet_core.io import sources, store
from alignet_core.pipeline.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage

STORE = "embeddings.zarr"


class SkippedImage(Record):
    """An image that could not be decoded: its row stays zero and invalid."""

    id: str
    path: str
    reason: str


class EmbedMetrics(StageMetrics):
    n_images: int
    n_valid: int
    dim: int
    skipped: list[SkippedImage]


class EmbedOutput(StageOutput):
    metrics: EmbedMetrics


def embed_compute(cfg: PipelineConfig) -> ComputeIdentity:
    """Where the rows are computed: the first of `embed.devices` (all of one kind), else `device`."""
    device = resolve_devices(cfg.embed.devices)[0] if cfg.embed.devices else resolve_device(cfg.device)
    return compute_identity(device)


def plan_embed(cfg: PipelineConfig, compute: ComputeIdentity | None = None) -> StagePlan:
    """The embed stage's plan; `compute` defaults to this machine's (`embed_compute`)."""
    compute = compute or embed_compute(cfg)
    conf = {"source": sources.source_identity(cfg.source), "embed": cfg.embed.model_dump(exclude={"devices"}),
            "compute": dataclasses.asdict(compute)}
    return plan_stage(cfg.root, "embed", conf, [], __name__)


def run_embed(cfg: PipelineConfig, progress: Callable[[int, int], None] | None = None) -> EmbedOutput:
    """Embed every image (resuming a killed run); `progress(done_rows, total_rows)` after each chunk."""
    plan = plan_embed(cfg)
    return once(plan, EmbedOutput, lambda: _embed(cfg, plan, progress), cfg.lock_timeout)


def _embed(cfg: PipelineConfig, plan: StagePlan, progress: Callable[[int, int], None] | None) -> EmbedOutput:
    """The stage's work, under its lock."""
    t0 = time.perf_counter()
    src = sources.source_from_config(cfg.source)
    url = store.join(plan.dir, STORE)
    info = extract_embeddings(src, cfg.embed, url, resolve_device(cfg.device), progress=progress)
    metrics = EmbedMetrics(n_images=info["n"], n_valid=info["n_valid"], dim=info["dim"],
                           skipped=[SkippedImage(**s) for s in info["skipped"]],
                           seconds=round(time.perf_counter() - t0, 2))
    return finish(plan, EmbedOutput, url, metrics, {"embed": cfg.embed.model_dump()}, [])
