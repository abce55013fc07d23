"""The gLocal affine transform: fit on synthetic triplets with a known answer, save/load, store application.

The synthetic "human" sees only a hidden 6-d part of 24-d features (a random rotation mixes it with
clustered nuisance dims); triplets are sampled from the softmax choice model over the hidden
similarities, so the true response probabilities are known and a linear transform can recover them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from alignet_core.config.transform import TransformConfig
from alignet_core.errors import InputError, StoreError
from alignet_core.human.triplets import split_triplets
from alignet_core.io import embedding_store, store
from alignet_core.stats.metrics import pair_similarities
from alignet_core.transform.affine import AffineTransform, apply_transform_to_store
from alignet_core.transform.fit import fit_transform, scaled_identity_penalty

CPU = torch.device("cpu")
_IMAGE_PERM = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])
_PAIR_PERM = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])


def _synthetic(m: int = 200, p: int = 24, d: int = 6, n: int = 2500, beta: float = 4.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(m, d))
    centers = rng.normal(size=(8, p - d)) * 0.6
    nuisance = centers[rng.integers(0, 8, m)] + rng.normal(size=(m, p - d)) * 0.3
    rot, _ = np.linalg.qr(rng.normal(size=(p, p)))
    x = np.concatenate([hidden, nuisance], 1) @ rot + 0.5
    t = np.stack([rng.choice(m, 3, replace=False) for _ in range(n)])
    h = hidden * np.sqrt(beta / d)
    a, b, c = h[t[:, 0]], h[t[:, 1]], h[t[:, 2]]
    s = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], 1)
    probs = np.exp(s - s.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    choice = (rng.random(n)[:, None] > np.cumsum(probs, 1)).sum(1)
    t = np.take_along_axis(t, _IMAGE_PERM[choice], 1)
    probs = np.take_along_axis(probs, _PAIR_PERM[choice], 1)
    return x.astype(np.float32), t, probs.astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    x, t, probs = _synthetic()
    tr, va = split_triplets(len(t), 0.2, seed=0)
    return x, t[tr], t[va], probs[tr], probs[va]


def _cfg(**kw) -> TransformConfig:
    base = dict(lr=1e-2, epochs=12, batch_size=128, local_batch=200, lam=1e-3, patience=4)
    return TransformConfig(**{**base, **kw})


def _choice_probs(transform: AffineTransform, objects: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    s = pair_similarities(transform.apply(objects), triplets).astype(np.float64)
    q = np.exp(s - s.max(1, keepdims=True))
    return q / q.sum(1, keepdims=True)


def _knn(e: np.ndarray, k: int = 10) -> np.ndarray:
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    c = u @ u.T
    np.fill_diagonal(c, -np.inf)
    return np.argsort(-c, axis=1)[:, :k]


def _knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    na, nb = _knn(a, k), _knn(b, k)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(na, nb)]))


def test_soft_fit_lifts_accuracy_and_reaches_calibrated_scale(data) -> None:
    x, tr, va, ptr, pva = data
    r = fit_transform(x, tr, va, _cfg(targets="soft", alpha=0.0), 0, CPU, ptr, pva)
    assert r.val_acc_before < 0.55
    assert r.val_acc_after > r.val_acc_before + 0.12
    assert r.train_acc_after > 0.6
    # from near-uniform choices (W = 1e-3 I) to softmax(s / T=1) matching the true probabilities
    assert r.val_loss_after < 0.1 * r.val_loss_before
    assert abs(r.calibration["p_pred"] - r.calibration["p_target"]) < 0.03
    assert r.history[0]["p_pred"] < r.calibration["p_pred"]
    assert r.transform.weight.shape == (24, 24) and r.transform.weight.dtype == np.float32
    assert {"train_loss", "val_loss", "val_acc"} <= set(r.history[0])
    assert r.best_epoch == int(np.argmin([h["val_loss"] for h in r.history]))


def test_local_term_preserves_neighbourhoods(data) -> None:
    x, tr, va, _, _ = data
    z = (x - x.mean()) / x.std()
    glob = fit_transform(x, tr, va, _cfg(targets="hard", alpha=0.0), 0, CPU)
    glocal = fit_transform(x, tr, va, _cfg(targets="hard", alpha=0.25), 0, CPU)
    keep_glob = _knn_overlap(z, glob.transform.apply(x))
    keep_glocal = _knn_overlap(z, glocal.transform.apply(x))
    assert keep_glocal > keep_glob + 0.15
    # and the gLocal fit still aligns: held-out accuracy clearly above zero-shot
    assert glocal.val_acc_after > glocal.val_acc_before + 0.08


def test_soft_targets_beat_hard_on_held_out_nll(data) -> None:
    x, tr, va, ptr, pva = data
    small = slice(0, 300)  # few triplets: the probabilities carry much more information than choices
    cfg = dict(alpha=0.0, epochs=20, patience=20)
    soft = fit_transform(x, tr[small], va, _cfg(targets="soft", **cfg), 0, CPU, ptr[small], pva)
    hard = fit_transform(x, tr[small], va, _cfg(targets="hard", **cfg), 0, CPU)

    def nll(r) -> float:  # expected held-out NLL of the human's choice, under the true probabilities
        return float(-(pva * np.log(_choice_probs(r.transform, x, va) + 1e-12)).sum(1).mean())

    assert nll(soft) < nll(hard) - 0.02


def test_regularizer_hand_case() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # mean diag 3: W - 3I = [[-2, 2], [3, 2]]
    assert float(scaled_identity_penalty(w)) == pytest.approx(21.0)
    assert float(scaled_identity_penalty(7.0 * torch.eye(4))) == 0.0  # scale is free


@pytest.mark.numerics
def test_deterministic_for_a_seed(data) -> None:
    x, tr, va, ptr, pva = data
    cfg = _cfg(targets="soft", alpha=0.25, epochs=2)
    a = fit_transform(x, tr, va, cfg, 7, CPU, ptr, pva)
    b = fit_transform(x, tr, va, cfg, 7, CPU, ptr, pva)
    c = fit_transform(x, tr, va, cfg, 8, CPU, ptr, pva)
    assert np.array_equal(a.transform.weight, b.transform.weight)
    assert np.array_equal(a.transform.bias, b.transform.bias)
    assert a.history == b.history
    assert not np.array_equal(a.transform.weight, c.transform.weight)


def test_soft_without_probabilities_falls_back_to_hard_and_bad_inputs_fail(data) -> None:
    x, tr, va, ptr, _ = data
    with pytest.raises(InputError, match="train_probs"):
        fit_transform(x, tr, va, _cfg(), 0, CPU, ptr[:10])
    with pytest.raises(InputError, match="val triplets"):
        fit_transform(x, tr, va + 1000, _cfg(), 0, CPU)
    with pytest.raises(InputError, match="pool"):
        fit_transform(x, tr, va, _cfg(), 0, CPU, pool=np.zeros((5, 3)))


def _random_transform(p: int = 6, seed: int = 0) -> AffineTransform:
    rng = np.random.default_rng(seed)
    return AffineTransform(
        mean=0.3, std=1.7, weight=rng.normal(size=(p, p)).astype(np.float32), bias=rng.normal(size=p).astype(np.float32)
    )


def test_save_load_round_trip(tmp_path) -> None:
    t = _random_transform()
    url = str(tmp_path / "t" / "transform.safetensors")
    t.save(url, {"config": {"alpha": 0.25}, "history": [{"val_acc": 0.5, "val_loss": float("nan")}]})
    back = AffineTransform.load(url)
    assert back.mean == t.mean and back.std == t.std
    assert np.array_equal(back.weight, t.weight) and np.array_equal(back.bias, t.bias)
    assert back.info["config"] == {"alpha": 0.25}
    x = np.random.default_rng(1).normal(size=(5, 6))
    assert np.array_equal(back.apply(x), t.apply(x))
    assert np.allclose(t.apply_torch(torch.as_tensor(x)).numpy(), t.apply(x), atol=1e-5)
    with pytest.raises(InputError, match="does not exist"):
        AffineTransform.load(str(tmp_path / "missing.safetensors"))


def _embedding_store(url: str, n: int = 50, p: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(n, p)).astype(np.float16)
    valid = np.ones(n, bool)
    valid[[3, 17, 41]] = False
    emb[~valid] = 0
    g = embedding_store.create_embedding_store(url, n, p, np.array([f"img{i}" for i in range(n)]), "float16", 16, {"model": "m"})
    g["embeddings"][:] = emb
    g["valid"][:] = valid
    return emb, valid


@pytest.mark.numerics
def test_apply_to_store_matches_apply_and_resumes(tmp_path) -> None:
    t = _random_transform()
    src, out = str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr")
    emb, valid = _embedding_store(src)
    info = apply_transform_to_store(src, out, t, chunk_rows=8, device=CPU)
    assert info["n"] == 50 and info["dim"] == 6 and info["chunks_written"] == 7
    g = zarr.open_group(out, mode="r")
    got = g["embeddings"][:]
    want = t.apply(emb)
    want[~valid] = 0
    assert got.dtype == np.float32 and g["embeddings"].compressors == ()  # raw: read whole many times
    assert np.allclose(got, want, atol=1e-5)
    assert np.array_equal(g["valid"][:], valid)
    assert g.attrs["model"] == "m" and g.attrs["transform"]["digest"] == t.digest()
    first = got.copy()

    # a killed run: two chunks lost their markers (and rows); the rerun redoes only those
    progress = embedding_store.ChunkProgress(out)
    store.remove(store.join(progress.dir, "00000002.done"))
    store.remove(store.join(progress.dir, "00000006.done"))
    w = zarr.open_group(out, mode="r+")
    w["embeddings"][16:24] = 0
    w["embeddings"][48:50] = 0
    again = apply_transform_to_store(src, out, t, chunk_rows=8, device=CPU)
    assert again["chunks_written"] == 2
    assert np.array_equal(zarr.open_group(out, mode="r")["embeddings"][:], first)

    # resuming with another transform or chunk size would mix outputs: refused
    with pytest.raises(StoreError):
        apply_transform_to_store(src, out, _random_transform(seed=5), chunk_rows=8, device=CPU)
    with pytest.raises(StoreError):
        apply_transform_to_store(src, out, t, chunk_rows=16, device=CPU)


def test_the_near_uniform_warning_says_what_happened(data, caplog) -> None:
    """Early stopping that keeps an early epoch is not told to raise the learning rate or the epochs."""
    from alignet_core.transform.fit import near_uniform_message

    early = near_uniform_message(epochs_run=5, max_epochs=16, best_epoch=1, p_pred=0.34)
    assert "early stopping kept epoch 2 of the 5 run" in early and "would not change that" in early
    assert "raise" not in early
    late = near_uniform_message(epochs_run=16, max_epochs=16, best_epoch=15, p_pred=0.34)
    assert "still falling at the last epoch (16)" in late and "raise transform.epochs" in late
    # a real fit whose held-out choices are noise: early stopping keeps epoch 1, and says so
    x, tr, va, _, _ = data
    noise = np.random.default_rng(9).permuted(va, axis=1)
    with caplog.at_level("WARNING", logger="alignet_core.transform.fit"):
        r = fit_transform(x, tr, noise, _cfg(targets="hard", alpha=0.0, lr=1e-3, patience=2), 0, CPU)
    assert r.calibration["p_pred"] < 0.4 and r.best_epoch < len(r.history) - 1
    assert any("early stopping kept epoch" in rec.message for rec in caplog.records)
