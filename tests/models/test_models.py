"""models.py: packaged ImageNet weights load strictly into timm and classify real photos correctly."""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import pytest
import skimage.data
import timm
import torch
from safetensors.torch import save_file

from alignet_core.errors import InputError
from alignet_core.models import factory as models

CAT = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
PHOTOS = {"chelsea": (skimage.data.chelsea, CAT), "coffee": (skimage.data.coffee, COFFEE)}


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return models.create_model("tf_efficientnet_lite2", "packaged")


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    return models.create_model("tf_efficientnet_lite0", "packaged")


@functools.cache
def _photo(photo: str) -> PIL.Image.Image:
    return PIL.Image.fromarray(PHOTOS[photo][0]())


def _logits(model: torch.nn.Module, photo: str) -> torch.Tensor:
    x = models.build_transform(model)(_photo(photo))[None]
    with torch.inference_mode():
        return model(x)[0]


def _top5(model: torch.nn.Module, photo: str) -> list[int]:
    return _logits(model, photo).topk(5).indices.tolist()


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_packaged_weights_remap_onto_every_timm_key(name: str) -> None:
    path = models.resolve_weights(name, "packaged")
    sd = models.load_state_dict(path)
    assert any(k.startswith("_blocks.") for k in sd)  # lukemelas naming in the file
    model = timm.create_model(name, pretrained=False)
    remapped = models.remap_efficientnet_lite_keys(sd, model)
    assert set(remapped) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert remapped[k].shape == v.shape, k
    model.load_state_dict(remapped, strict=True)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_pretrained_models_classify_real_photos(which: str, photo: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    assert not model.training
    top5 = _top5(model, photo)
    expected = PHOTOS[photo][1]
    assert top5[0] in expected, f"{which} on {photo}: top-5 {top5}, expected top-1 in {sorted(expected)}"
    assert len(expected & set(top5)) >= 2


def _swap(sd: dict[str, torch.Tensor], a: str, b: str) -> dict[str, torch.Tensor]:
    """Exchange the tensors under prefixes a and b (same shapes), as a wrong key map would."""
    out = dict(sd)
    for key in sd:
        if key.startswith(a):
            other = b + key[len(a) :]
            out[key], out[other] = sd[other], sd[key]
    return out


def test_a_broken_remap_that_still_loads_strictly_fails_the_photo_check(student: torch.nn.Module) -> None:
    """The classic name-matching bug (lukemelas _bn0/_bn1 taken as timm bn1/bn2) fits every shape; the
    photo check is what catches it."""
    broken = student.state_dict()
    for s, stage in enumerate(student.blocks):
        for b, block in enumerate(stage):
            if hasattr(block, "conv_pwl"):
                broken = _swap(broken, f"blocks.{s}.{b}.bn1.", f"blocks.{s}.{b}.bn2.")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(broken, strict=True)
    model.eval()
    assert _top5(model, "chelsea")[0] not in CAT or _top5(model, "coffee")[0] not in COFFEE


def test_flat_blocks_map_to_stage_blocks_in_order() -> None:
    """Repeated blocks of a stage have equal shapes and, being residual, nearly commute, so photos barely
    notice a swap of two of them (cat mass 0.92 -> 0.80): pin the order against the known Lite0 layout."""
    path = models.resolve_weights("tf_efficientnet_lite0", "packaged")
    sd = models.load_state_dict(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    remapped = models.remap_efficientnet_lite_keys(sd, model)
    layout = [1, 2, 2, 3, 3, 4, 1]  # blocks per stage of EfficientNet-Lite0
    flat = [(s, b) for s, n in enumerate(layout) for b in range(n)]
    assert [len(stage) for stage in model.blocks] == layout
    for i, (s, b) in enumerate(flat):
        assert remapped[f"blocks.{s}.{b}.conv_dw.weight"] is sd[f"_blocks.{i}._depthwise_conv.weight"]
        if i > 0:
            assert remapped[f"blocks.{s}.{b}.conv_pw.weight"] is sd[f"_blocks.{i}._expand_conv.weight"]
            assert remapped[f"blocks.{s}.{b}.bn3.running_var"] is sd[f"_blocks.{i}._bn2.running_var"]


def test_a_wrong_block_order_fails_the_strict_load(tmp_path) -> None:
    sd = models.load_state_dict(models.resolve_weights("tf_efficientnet_lite0", "packaged"))
    shuffled = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            parts[1] = str(15 - int(parts[1]))  # reversed flat numbering
        shuffled[".".join(parts)] = value
    path = tmp_path / "reversed.pth"
    torch.save(shuffled, path)
    with pytest.raises(InputError, match="reversed.pth"):
        models.create_model("tf_efficientnet_lite0", str(path))


def test_features_and_preprocessing_come_from_the_model(teacher: torch.nn.Module) -> None:
    cfg = models.data_config(teacher)
    assert cfg["input_size"] == (3, 260, 260) and cfg["mean"] == (0.5, 0.5, 0.5)
    x = models.build_transform(teacher)(_photo("coffee"))
    assert x.shape == (3, 260, 260) and x.dtype == torch.float32
    with torch.inference_mode():
        f = models.pooled_features(teacher, x[None])
    assert f.shape == (1, models.feature_dim(teacher)) == (1, 1280)
    assert torch.isfinite(f).all()


def test_weights_from_a_local_safetensors_file(student: torch.nn.Module, tmp_path) -> None:
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(path))
    model = models.create_model("tf_efficientnet_lite0", str(path))
    expected = student.state_dict()
    assert all(torch.equal(p, expected[name]) for name, p in model.state_dict().items())
    assert _top5(model, "coffee")[0] in COFFEE
    # a wrapped torch checkpoint of the original (lukemelas) file is remapped too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": models.load_state_dict(models.resolve_weights("tf_efficientnet_lite0", "packaged"))}, wrapped)
    from_pth = models.create_model("tf_efficientnet_lite0", str(wrapped)).state_dict()
    assert all(torch.equal(from_pth[name], p) for name, p in expected.items())


def test_random_init_when_weights_is_none() -> None:
    model = models.create_model("resnet10t", None)
    assert not model.training and models.feature_dim(model) == 512


def test_unknown_model_name_lists_close_matches() -> None:
    with pytest.raises(InputError, match="tf_efficientnet_lite2") as err:
        models.create_model("tf_efficientnet_lite22")
    assert "not a timm model" in str(err.value)


def test_missing_or_mismatched_weights_are_input_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        models.create_model("tf_efficientnet_lite0", str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match="packaged"):
        models.resolve_weights("resnet10t", "packaged")
    with pytest.raises(InputError, match="does not fit"):
        models.create_model("tf_efficientnet_lite2", models.resolve_weights("tf_efficientnet_lite0", "packaged"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="junk.pth"):
        models.create_model("tf_efficientnet_lite0", str(junk))


@pytest.mark.numerics
@pytest.mark.parametrize(("name", "weights", "pairs"), [("tf_efficientnet_lite0", "packaged", 49), ("test_resnet", None, 15)])
def test_fold_batchnorm_keeps_the_features_and_the_original_model(name: str, weights, pairs: int) -> None:
    model = models.create_model(name, weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded, n = models.fold_batchnorm(model, x)
    assert n == pairs and folded is not model
    y = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        np.testing.assert_allclose(models.pooled_features(folded, y), models.pooled_features(model, y), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kept, n_kept = models.fold_batchnorm(model, x, keep={"conv1.0" if name == "test_resnet" else "conv_stem"})
    assert n_kept == pairs - 1
