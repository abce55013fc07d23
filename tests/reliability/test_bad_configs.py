"""Config mistakes fail before any work, through the user-facing CLI: exit 2, one line on stderr
that names the field and what is expected, no traceback, nothing created under the root.

`alignet validate` and every `alignet run`/stage command share the same check
(`flows._config.resolve_context` → `parse_config` + `pipeline.preflight`) before anything runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from alignet_core.io.sources import demo_source
from flows.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real demo images in two class folders, the same six in a flat folder, and an empty folder."""
    base = tmp_path_factory.mktemp("images")
    for i, rec in enumerate(demo_source().records[::300][:6]):
        (base / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, base / "imgs" / f"c{i % 2}" / Path(rec.path).name)
        (base / "flat").mkdir(exist_ok=True)
        shutil.copy(rec.path, base / "flat" / Path(rec.path).name)
    (base / "empty").mkdir()
    np.save(base / "probs.npy", np.full((2, 3), 1 / 3))
    return base


FOLDER = "<folder>"  # replaced by the fixture's path

# (case, config (a dict, or YAML text), what the one-line error must contain: the field, what is expected)
CASES: list[tuple[str, Any, list[str]]] = [
    ("unknown top-level field", {"clustr": {"k": 3}}, ["clustr", "unknown field", "did you mean 'cluster'"]),
    ("unknown field in a section", {"cluster": {"kk": 3}}, ["cluster.kk", "unknown field", "expected one of"]),
    ("wrong type", {"cluster": {"k": "many"}}, ["cluster.k", "valid integer", "'many'"]),
    ("negative k", {"cluster": {"k": -3}}, ["cluster.k", "greater than 1"]),
    ("k larger than the number of images", {"source": {"limit": 10}, "cluster": {"k": 20}},
     ["cluster.k", "at most the number of images"]),
    ("source path missing", {"source": {"kind": "folder"}}, ["source.path", "required"]),
    ("source folder does not exist", {"source": {"kind": "folder", "path": "/nope/images"}},
     ["source.path", "/nope/images", "does not exist"]),
    ("empty source folder", {"source": {"kind": "folder", "path": f"{FOLDER}/empty"}, "transform": {"enabled": False}},
     ["/empty", "no images found", "expected files ending in"]),
    ("file list does not exist", {"source": {"kind": "filelist", "path": "/nope/list.csv"}},
     ["source.path", "/nope/list.csv", "does not exist"]),
    ("source limit too small", {"source": {"limit": 1}}, ["source.limit", "greater than 2"]),
    ("unknown teacher model", {"embed": {"model": "resnet_9000"}}, ["embed.model", "unknown timm model"]),
    ("unknown student model", {"distill": {"student": "not_a_model"}}, ["distill.student", "unknown timm model"]),
    ("weights file missing", {"embed": {"weights": "/nope/w.safetensors"}},
     ["embed.weights", "/nope/w.safetensors", "does not exist", "expected 'packaged'"]),
    ("unknown extra layer", {"embed": {"layers": ["blocks.99"]}}, ["embed.layers", "blocks.99", "named_modules"]),
    ("wrong store dtype", {"embed": {"store_dtype": "int8"}}, ["embed.store_dtype", "'float16' or 'float32'"]),
    ("GPU devices without a GPU", {"embed": {"devices": ["cuda:0", "cuda:1"]}}, ["embed.devices", "cuda"]),
    ("unknown sampling strategy", {"sample": {"strategies": ["random"]}},
     ["sample.strategies", "random", "'between_class'"]),
    ("repeated sampling strategy", {"sample": {"strategies": ["cluster", "cluster"]}, "distill": {"strategy": "cluster"}},
     ["sample.strategies", "duplicates"]),
    ("distill strategy not sampled", {"distill": {"strategy": "within_class"}},
     ["distill.strategy", "must be one of sample.strategies"]),
    ("last blocks of a student without blocks", {"distill": {"student": "resnet10t", "weights": None, "train_blocks": 2}},
     ["distill.train_blocks", "distill.student 'resnet10t' (ResNet) has no", "EfficientNet-class"]),
    ("more blocks than the student has", {"distill": {"train_blocks": 40}},
     ["distill.train_blocks", "expected 0 to 16 (the student's blocks), got 40"]),
    ("grad_accum does not divide the batch", {"distill": {"batch_triplets": 10, "grad_accum": 3}},
     ["distill.grad_accum", "must divide", "(10)"]),
    ("unknown training device", {"distill": {"devices": ["cpu", "tpu:0"]}},
     ["distill.devices", "'tpu:0'", "expected 'cpu', 'cuda' or 'cuda:<index>'"]),
    ("training devices of two kinds", {"distill": {"devices": ["cuda:0", "cpu"]}},
     ["distill.devices", "mixes cpu and cuda", "one kind"]),
    ("training GPUs without a GPU", {"distill": {"devices": ["cuda:0", "cuda:1"]}}, ["distill.devices", "no CUDA GPU"]),
    ("rank count does not divide the batch", {"distill": {"devices": ["cpu", "cpu", "cpu"], "batch_triplets": 32}},
     ["distill.devices", "3 ranks", "must divide distill.batch_triplets (32)"]),
    ("human triplets file missing", {"human": {"triplets": "/nope/t.txt"}}, ["human.triplets", "does not exist"]),
    ("probabilities without triplets", {"human": {"probabilities": f"{FOLDER}/probs.npy"}},
     ["human.probabilities", "without human.triplets"]),
    ("unlabelled images without human triplets", {"source": {"kind": "folder", "path": f"{FOLDER}/flat"},
                                                   "cluster": {"k": 2}},
     ["human.triplets", "6 of the 6 images", "have no label", "no taxonomy proxy"]),
    ("demo-only field on a folder", {"source": {"kind": "folder", "path": f"{FOLDER}/imgs", "label_level": "category"}},
     ["source.label_level applies to the demo set only"]),
    ("transform weight out of range", {"transform": {"alpha": 1.5}}, ["transform.alpha", "less than or equal to 1"]),
    ("negative seed", {"seed": -1}, ["seed", "greater than or equal to 0"]),
    ("unknown device", {"device": "tpu"}, ["device", "'auto', 'cpu' or 'cuda'"]),
    ("cuda without a GPU", {"device": "cuda"}, ["device", "no CUDA GPU", "'auto' or 'cpu'"]),
    ("dataset name escaping the root", {"dataset_name": "../../etc"}, ["dataset_name", "pattern", "../../etc"]),
    ("negative lock timeout", {"lock_timeout": -1}, ["lock_timeout", "greater than or equal to 0"]),
    ("config is not a mapping", "- cluster\n- k\n", ["config", "expected a mapping", "list"]),
    ("config is not YAML", "cluster: [unclosed\n", ["config file", "not valid YAML"]),
]


def _fill(value: Any, folder: Path) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, folder) for v in value]
    return value.replace(FOLDER, str(folder)) if isinstance(value, str) else value


def _validate(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_at_least_fifteen_distinct_mistakes() -> None:
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("case, config, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_before_any_work_naming_the_field(case, config, needles, folder, tmp_path, capsys) -> None:
    if case in ("cuda without a GPU", "GPU devices without a GPU", "training GPUs without a GPU") \
            and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    root = tmp_path / "root"
    path = tmp_path / "config.yaml"
    if isinstance(config, dict):
        path.write_text(yaml.safe_dump({"root": str(root), **_fill(config, folder)}))
    else:
        path.write_text(config)
    err = _validate(["--config", str(path)], capsys)
    for needle in needles:
        assert needle.replace(FOLDER, str(folder)) in err, f"{case}: {needle!r} not in {err!r}"
    assert not root.exists(), f"{case}: something was written before the config was rejected"


def test_missing_config_file_and_bad_override(tmp_path, capsys) -> None:
    err = _validate(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml" in err and "does not exist" in err
    err = _validate(["--set", "cluster.k=zero"], capsys)
    assert "cluster.k" in err and "valid integer" in err
