"""Stage 0, embed: the teacher's pooled pre-logits of every image → `<dir>/embeddings.zarr`.

In: the image source (`source`) and the teacher (`embed`). Out: an embedding store
(`io.embedding_store`), rows in source order. The key covers the source's identity, the embed
config except `devices` (which devices of one kind run the extraction changes no output) and the
compute identity: GPU rows are computed under bf16 autocast, CPU rows in float32, so a store made
on one is never served for the other.

With `source.kind: embeddings` the rows are imported instead (`importer`): the key covers the
array's identity (sha256, shape, dtype, ids and labels hashes: `sources.source_identity`) and the
store's dtype and chunking; the teacher settings (`embed.model`, `weights`, ...) do not apply.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.embed.importer import checked_import, import_embeddings
from alignet_core.errors import InputError
from alignet_core.hardware import ComputeIdentity, compute_identity, resolve_device, resolve_devices
from alignet_core.io import sources, store
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage

STORE = "embeddings.zarr"


class SkippedImage(Record):
    """An image that could not be decoded: its row stays zero and invalid."""

    id: str
    path: str
    reason: str


class ImportedArray(Record):
    """Where imported rows came from (`source.kind: embeddings`)."""

    path: str
    format: str
    dataset: str | None
    sha256: str
    shape: list[int]
    dtype: str
    ids_sha256: str
    labels_sha256: str | None


class EmbedMetrics(StageMetrics):
    n_images: int
    n_valid: int
    dim: int
    skipped: list[SkippedImage]
    imported: ImportedArray | None = None  # set when the rows were imported, not extracted

    def teacher(self, model: str) -> str:
        """Who made the rows: the timm model, or 'imported: <path>'."""
        return model if self.imported is None else f"imported: {self.imported.path}"

    def skipped_fraction(self) -> float:
        return len(self.skipped) / max(self.n_images, 1)

    def skipped_reasons(self) -> dict[str, int]:
        """How many images were skipped for each reason (the file's own path taken out), most common first."""
        counts = Counter(s.reason.replace(s.path, "<file>")[:160] for s in self.skipped)
        return dict(counts.most_common())


class EmbedOutput(StageOutput):
    metrics: EmbedMetrics


def embed_compute(cfg: PipelineConfig) -> ComputeIdentity:
    """Where the rows are computed: the first of `embed.devices` (all of one kind), else `device`."""
    device = resolve_devices(cfg.embed.devices)[0] if cfg.embed.devices else resolve_device(cfg.device)
    return compute_identity(device)


def plan_embed(cfg: PipelineConfig, compute: ComputeIdentity | None = None) -> StagePlan:
    """The embed stage's plan; `compute` defaults to this machine's (`embed_compute`)."""
    if cfg.source.kind == "embeddings":
        conf = {"source": sources.source_identity(cfg.source),
                "embed": cfg.embed.model_dump(include={"store_dtype", "chunk_rows"})}
        return plan_stage(cfg.root, "embed", conf, [], __name__)
    compute = compute or embed_compute(cfg)
    conf = {"source": sources.source_identity(cfg.source),
            "embed": cfg.embed.key_dump(),
            "compute": dataclasses.asdict(compute)}
    return plan_stage(cfg.root, "embed", conf, [], __name__)


def run_embed(ctx: RunContext, progress: Callable[[int, int], None] | None = None) -> EmbedOutput:
    """Embed every image (resuming a killed run); `progress(done_rows, total_rows)` after each chunk.

    `InputError` when more than `embed.max_skipped_fraction` of the images were skipped; the store is kept
    (finished), so a rerun with the images fixed (a new source key) or a higher limit loses nothing."""
    cfg = ctx.cfg
    if cfg.source.kind == "embeddings":
        checked_import(cfg)  # a bad array or store dtype is refused before anything is written
    plan = ctx.plan(plan_embed)
    out = once(plan, EmbedOutput, lambda: _embed(ctx, plan, progress), cfg.lock_timeout)
    check_skipped(out.metrics, cfg.embed.max_skipped_fraction)
    return out


def check_skipped(m: EmbedMetrics, limit: float) -> None:
    """`InputError` naming the count, the fraction, the reasons and a few files when more than `limit` of
    the images were skipped."""
    if not m.skipped or m.skipped_fraction() <= limit:
        return
    reasons = "; ".join(f"{n} × {r}" for r, n in list(m.skipped_reasons().items())[:3])
    examples = ", ".join(s.path for s in m.skipped[:3])
    raise InputError(
        f"embed.max_skipped_fraction: {len(m.skipped)} of {m.n_images} images ({100 * m.skipped_fraction():.1f}%) "
        f"could not be read or decoded, more than the limit {100 * limit:g}% (reasons: {reasons}; e.g. {examples}). "
        "Fix or remove them, or raise embed.max_skipped_fraction; the embeddings of the others are kept"
    )


def _embed(ctx: RunContext, plan: StagePlan, progress: Callable[[int, int], None] | None) -> EmbedOutput:
    """The stage's work, under its lock."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    url = store.join(plan.dir, STORE)
    if cfg.source.kind == "embeddings":
        info = import_embeddings(cfg, ctx.source.ids(), url, progress=progress)
        config = {"embed": cfg.embed.model_dump(include={"store_dtype", "chunk_rows"})}
    else:
        src = ctx.source
        from alignet_core.embed.extract import extract_embeddings  # torch, timm: only when images are embedded

        info = extract_embeddings(src, cfg.embed, url, resolve_device(cfg.device), progress=progress)
        config = {"embed": cfg.embed.model_dump()}
    metrics = EmbedMetrics(n_images=info["n"], n_valid=info["n_valid"], dim=info["dim"],
                           skipped=[SkippedImage(**s) for s in info["skipped"]], imported=info.get("imported"),
                           seconds=round(time.perf_counter() - t0, 2))
    return finish(plan, EmbedOutput, url, metrics, config, [])
