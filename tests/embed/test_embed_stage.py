"""The embed stage (embed/stage.py): its key and provenance, and its refusal of too many skipped images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignet_core.config import parse_config
from alignet_core.context import RunContext
from alignet_core.errors import InputError
from alignet_core.io.sources import ImageSource
from tests.embed._embed import _write_corrupt_files, demo40  # noqa: F401 (fixtures)


def test_stage_key_ignores_devices_but_not_compile_or_decode(tmp_path: Path) -> None:
    """Which devices run the extraction changes no stored value, so a store made on two workers
    is reused (or resumed) by a one-device run; compile and decode change rounding, so they key."""
    from alignet_core.config import PipelineConfig
    from alignet_core.embed.stage import plan_embed

    def key(**embed: object) -> str:
        return plan_embed(PipelineConfig(root=str(tmp_path), embed=embed)).key

    base = key()
    assert key(devices=["cpu", "cpu"]) == key(devices=["cpu"]) == base
    assert len({base, key(compile=True), key(decode="torchvision")}) == 3


def test_stage_key_and_provenance_name_the_compute_device_and_dtype(tmp_path: Path) -> None:
    """GPU rows are bf16-autocast, CPU rows float32: a store made on one is never served for the other."""
    from alignet_core.config import PipelineConfig
    from alignet_core.embed.stage import embed_compute, plan_embed
    from alignet_core.hardware import ComputeIdentity

    cfg = PipelineConfig(root=str(tmp_path), device="cpu")
    assert embed_compute(cfg) == ComputeIdentity(device="cpu", dtype="float32")
    cpu = plan_embed(cfg)
    assert cpu.key == plan_embed(cfg, ComputeIdentity("cpu", "float32")).key
    keys = {cpu.key, plan_embed(cfg, ComputeIdentity("cuda", "bfloat16")).key,
            plan_embed(cfg, ComputeIdentity("cuda", "float32")).key, plan_embed(cfg, ComputeIdentity("cpu", "bfloat16")).key}
    assert len(keys) == 4


def test_the_stage_refuses_too_many_skipped_images_and_keeps_the_embeddings(demo40: ImageSource, tmp_path: Path) -> None:
    """run_embed: 3 of 10 images undecodable → InputError naming the count, the limit and the reasons; the
    store is finished and kept, and a higher `embed.max_skipped_fraction` reuses it under the same key."""
    from alignet_core.embed.stage import plan_embed, run_embed

    folder = tmp_path / "images"
    for rec in demo40.records[:7]:
        (folder / "ok").mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folder / "ok" / Path(rec.path).name)
    (folder / "bad").mkdir()
    _write_corrupt_files(folder / "bad")
    cfg = parse_config({"root": str(tmp_path / "root"), "device": "cpu", "source": {"kind": "folder", "path": str(folder)},
                        "cluster": {"k": 2}, "embed": {"model": "test_resnet", "weights": None, "chunk_rows": 4}})
    with pytest.raises(InputError, match=r"embed.max_skipped_fraction: 3 of 10 images \(30.0%\).*limit 1%.*"
                                         r"reasons: .*bad/"):
        run_embed(RunContext.of(cfg))
    plan = plan_embed(cfg)
    manifest = Path(plan.dir) / "manifest.json"
    assert manifest.exists()
    looser = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"max_skipped_fraction": 0.3})})
    assert plan_embed(looser).key == plan.key
    before = manifest.stat().st_mtime_ns
    out = run_embed(RunContext.of(looser))
    assert manifest.stat().st_mtime_ns == before and len(out.metrics.skipped) == 3 and out.metrics.n_valid == 7
    assert sum(out.metrics.skipped_reasons().values()) == 3
