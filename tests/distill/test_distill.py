"""Stage 4 (distillation): losses, decay-to-init, data order, resume after a kill, export, learning.

Everything runs for real: demo emoji images decoded by `images.load_image`, real timm models
(a random-init `resnet10t` at 32 px for speed; the packaged EfficientNet-Lite0 where the
pretrained weights matter), real optimizer steps.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import PIL.Image
import pytest
import timm
import torch
from safetensors.torch import load_file

from alignet_core.config.distill import DistillConfig
from alignet_core.distill.batches import TripletBatches
from alignet_core.distill.evaluation import evaluate_student
from alignet_core.distill.objective import AdamDecayToInit, alignet_loss, warmup_cosine
from alignet_core.distill.train import train_student
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io import formats, images, sources
from alignet_core.io.dataset_splits import join_by_filenames, join_mode, read_split
from alignet_core.models import factory as models
from alignet_core.models.student import HEAD_FILE, LOG_FILE, STUDENT_FILE
from alignet_core.models.embedding import decode_images, embed_images
from alignet_core.models.student import build_student, eval_transform, load_student
from alignet_core.stats.metrics import pair_similarities, triplet_accuracy
from tests.killed_distillation import run_until_killed

TINY = "resnet10t"  # random init, 32 px: a few hundred ms per step on a 2-core CPU


def tiny_cfg(**kw) -> DistillConfig:
    base = dict(student=TINY, weights=None, head_dim=32, steps=6, batch_triplets=8, lr=1e-3,
                warmup_steps=2, checkpoint_every=2, image_size=32)
    return DistillConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def pool() -> sources.ImageSource:
    """60 demo emoji (a fixed, spread-out subset), row i = records[i]."""
    demo = sources.demo_source()
    pick = np.random.default_rng(0).choice(len(demo), 60, replace=False)
    return sources.ImageSource(tuple(demo.records[i] for i in np.sort(pick)), "demo subset (60)")


def pixel_teacher(src: sources.ImageSource) -> np.ndarray:
    """A fixed 'teacher' embedding: the centred 4x4 RGB thumbnail of each image, (n, 48) float64."""
    rows = [np.asarray(images.load_image(r.path).resize((4, 4), PIL.Image.BILINEAR), np.float64).ravel() / 255.0
            for r in src.records]
    e = np.stack(rows)
    return e - e.mean(0)


def teacher_triplets(emb: np.ndarray, n: int, seed: int, scale: float = 3.0) -> formats.AlignetTriplets:
    """Random triplets over the pool, ordered by the teacher (odd one last), sims scaled to std `scale`."""
    g = np.random.default_rng(seed)
    idx = np.stack([g.choice(len(emb), 3, replace=False) for _ in range(n)])
    a, b, c = emb[idx[:, 0]], emb[idx[:, 1]], emb[idx[:, 2]]
    s = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], 1)
    s = s / s.std() * scale
    idx, s, _ = formats.order_by_similarity(idx, s)
    strict = (s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])
    idx, s = idx[strict], s[strict].astype(np.float32)
    names = np.full(idx.shape, "", dtype=object)
    return formats.AlignetTriplets(idx, names.astype(str), s)


@pytest.fixture(scope="module")
def teacher(pool):
    return pixel_teacher(pool)


@pytest.fixture(scope="module")
def train_split(pool, teacher, tmp_path_factory) -> tuple[formats.AlignetTriplets, str]:
    """800 teacher triplets written and read back in the official AligNet .npz format."""
    t = teacher_triplets(teacher, 800, seed=1)
    names = np.asarray([[os.path.basename(pool.records[i].path) for i in row] for row in t.indices])
    url = str(tmp_path_factory.mktemp("ds") / "train_cluster_border_12.npz")
    formats.write_alignet_npz(url, t.indices, names, t.similarities)
    return formats.read_alignet_npz(url, len(pool)), url


# ----------------------------------------------------------------------------- losses
def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_losses_match_hand_computed_values():
    student = np.array([[120.0, 40.0, -30.0], [10.0, 90.0, 50.0]])
    teacher_sims = np.array([[2.0, 0.5, -1.0], [1.0, 0.9, 0.2]])
    p, q = _np_softmax(teacher_sims), _np_softmax(student / 100.0)
    kl = lambda a, b: (a * np.log(a / b)).sum(-1)  # noqa: E731
    m = (p + q) / 2
    want = {
        "kl": kl(p, q).mean(),
        "jsd": (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean(),
        "hard": (-student[:, 0] / 100 + np.log(np.exp(student / 100).sum(-1))).mean(),
    }
    # a worked number for one row, by hand: p = softmax([2, .5, -1]) = [.7856, .1753, .0391]
    np.testing.assert_allclose(p[0], [0.785597, 0.175290, 0.039112], atol=1e-6)
    for kind, value in want.items():
        got = alignet_loss(torch.tensor(student), torch.tensor(teacher_sims), kind, tau=100.0)
        assert got.ndim == 0
        np.testing.assert_allclose(float(got), value, rtol=1e-5, err_msg=kind)
    # identical distributions: both divergences vanish; JSD is symmetric and bounded by log 2
    same = torch.tensor(teacher_sims * 100.0)
    assert abs(float(alignet_loss(same, torch.tensor(teacher_sims), "kl"))) < 1e-6
    assert abs(float(alignet_loss(same, torch.tensor(teacher_sims), "jsd"))) < 1e-6
    far = alignet_loss(torch.tensor([[-1e4, 0.0, 1e4]]), torch.tensor([[50.0, 0.0, -50.0]]), "jsd")
    assert 0.0 < float(far) <= np.log(2) + 1e-6
    with pytest.raises(ConfigError, match="distill.loss"):
        alignet_loss(torch.tensor(student), torch.tensor(teacher_sims), "mse")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"\(b, 3\)"):
        alignet_loss(torch.zeros(2, 4), torch.zeros(2, 4))


def test_loss_gradient_pushes_student_toward_teacher_pair():
    s = torch.zeros(1, 3, requires_grad=True)
    alignet_loss(s, torch.tensor([[5.0, 0.0, 0.0]]), "jsd").backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1] and s.grad[0, 2] > 0  # descending raises s01


# ----------------------------------------------------------------------------- optimizer
def test_decay_to_init_with_zero_gradient_moves_exactly_lr_w_delta():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    theta0 = [p.detach().clone() for p in layer.parameters()]
    lr, w = 0.1, 0.5
    opt = AdamDecayToInit(layer.parameters(), lr=lr, decay_to_init=w)
    with torch.no_grad():  # pretend training moved θ away from θ₀
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    before = [p.detach().clone() for p in layer.parameters()]
    layer.weight.grad = torch.zeros_like(layer.weight)  # zero gradient ...
    layer.bias.grad = None  # ... and no gradient at all: both only decay
    opt.step()
    for p, b, t0 in zip(layer.parameters(), before, theta0):
        np.testing.assert_allclose(p.detach().numpy(), (b - lr * w * (b - t0)).numpy(), rtol=0, atol=1e-7)
    # no decay weight: a zero gradient leaves θ where it is
    opt0 = AdamDecayToInit([torch.nn.Parameter(torch.ones(4))], lr=lr, decay_to_init=0.0)
    q = opt0.param_groups[0]["params"][0]
    q.grad = torch.zeros(4)
    opt0.step()
    assert torch.equal(q.detach(), torch.ones(4))


@pytest.mark.numerics
def test_adam_part_matches_torch_adam():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamDecayToInit([a], lr=1e-2, decay_to_init=0.0)
    ref = torch.optim.Adam([b], lr=1e-2, eps=1e-8)
    for k in range(5):
        g = torch.randn(50, generator=torch.Generator().manual_seed(k))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_warmup_cosine_schedule():
    f = warmup_cosine(4, 14)
    np.testing.assert_allclose([f(s) for s in range(4)], [0.2, 0.4, 0.6, 0.8])
    assert f(4) == 1.0
    np.testing.assert_allclose(f(9), 0.5, atol=1e-12)
    assert abs(f(14)) < 1e-12 and all(f(s) > f(s + 1) for s in range(4, 13))


# ----------------------------------------------------------------------------- data
def test_triplet_batches_decode_each_image_once_in_a_deterministic_order(pool, train_split):
    split, _ = train_split
    model = models.create_model(TINY, None)
    tf = eval_transform(model, 32)
    a = TripletBatches(split, pool, tf, 16, seed=3)
    images, rows, sims, ids = a[0]
    assert images.shape[1:] == (3, 32, 32) and rows.shape == (16, 3) and sims.shape == (16, 3)
    # every unique image once, and rows point at the right decoded images
    want_pool_rows = split.indices[ids.numpy()]
    assert images.shape[0] == len(np.unique(want_pool_rows)) < 48
    ref = decode_images([pool.records[i].path for i in want_pool_rows[:, 2]], tf)
    assert torch.equal(images[rows[:, 2]], ref)
    np.testing.assert_array_equal(sims.numpy(), split.similarities[ids.numpy()])
    # same (seed, step) → same batch, whoever asks and in whatever order
    b = TripletBatches(split, pool, tf, 16, seed=3)
    assert torch.equal(b[7][3], a[7][3]) and torch.equal(b[0][3], ids)
    assert not torch.equal(TripletBatches(split, pool, tf, 16, seed=4)[0][3], ids)
    # an epoch is a permutation: each triplet once; the next epoch reshuffles
    epoch = np.concatenate([a[k][3].numpy() for k in range(len(a))])
    assert len(np.unique(epoch)) == len(epoch) == (len(split) // 16) * 16
    assert not np.array_equal(a[len(a)][3].numpy(), a[0][3].numpy())
    # grad accumulation cuts the same step into equal micro-batches
    c = TripletBatches(split, pool, tf, 16, seed=3, grad_accum=2)
    np.testing.assert_array_equal(np.concatenate([c[0][3], c[1][3]]), ids.numpy())
    with pytest.raises(ConfigError, match="grad_accum"):
        TripletBatches(split, pool, tf, 15, seed=3, grad_accum=2)
    with pytest.raises(InputError, match="fewer than"):
        TripletBatches(split, pool, tf, 10_000, seed=3)


def test_cached_images_give_the_same_batches(pool, train_split):
    split, _ = train_split
    tf = eval_transform(models.create_model(TINY, None), 32)
    plain = TripletBatches(split, pool, tf, 16, seed=3, grad_accum=2)
    cached = TripletBatches(split, pool, tf, 16, seed=3, grad_accum=2, cache=True)
    assert cached._cache is not None and len(cached._cache) == len(np.unique(split.indices))
    for k in (0, 1, 5, len(plain) + 2):
        for x, y in zip(plain[k], cached[k]):
            assert torch.equal(x, y)


def test_join_by_filenames_points_foreign_triplets_at_the_source(pool):
    ids = [r.id for r in pool.records]
    bases = [os.path.basename(r.path) for r in pool.records]
    # a foreign file: indices number another pool (garbage here); names are our ids or file names
    names = np.array([[ids[0], bases[5], ids[9]], [bases[2], ids[3], ids[4]]])
    foreign = formats.AlignetTriplets(np.full((2, 3), 10_000), names, np.array([[3, 1, 0], [2, 1, 0]], np.float32))
    joined = join_by_filenames(foreign, pool, "x.npz")
    np.testing.assert_array_equal(joined.indices, [[0, 5, 9], [2, 3, 4]])
    np.testing.assert_array_equal(joined.similarities, foreign.similarities)
    bad = formats.AlignetTriplets(foreign.indices, np.array([[ids[0], "n01440764_10026.JPEG", ids[1]]] * 2),
                                  foreign.similarities)
    with pytest.raises(InputError, match=r"x.npz: 1 of 3 filenames match no image.*n01440764_10026"):
        join_by_filenames(bad, pool, "x.npz")
    # a file name two images share is ambiguous and never matches
    twin = sources.ImageSource((pool.records[0], sources.ImageRecord("other", "/elsewhere/" + bases[0])), "twins")
    with pytest.raises(InputError, match="match no image"):
        join_by_filenames(formats.AlignetTriplets(np.zeros((1, 3), int), np.array([[bases[0]] * 3]),
                                                          np.zeros((1, 3), np.float32)), twin, "y.npz")


def test_filenames_that_disagree_with_the_images_at_their_indices_are_refused(pool, train_split, tmp_path):
    split, url = train_split
    assert len(read_split(url, pool, "indices")) == len(split)  # names = the rows' file names: agrees
    # the same triplets over the images in another order (a release whose images are not in source order)
    perm = np.random.default_rng(0).permutation(len(pool))
    shuffled = str(tmp_path / "train_x.npz")
    formats.write_alignet_npz(shuffled, perm[split.indices], split.filenames, split.similarities)
    with pytest.raises(InputError, match=rf"train_x.npz: \d+ of {split.filenames.size} filenames disagree with the "
                                         r"source's images at their indices \(row 0: index"):
        read_split(shuffled, pool, "indices")
    # joined by what the file says, the triplets land on the right images again
    np.testing.assert_array_equal(read_split(shuffled, pool, "filenames").indices, split.indices)
    assert join_mode("/a/release", "auto") == "filenames" and join_mode(None, "auto") == "indices"
    assert join_mode("/a/release", "indices") == "indices"


def test_a_student_whose_pre_logits_width_is_not_num_features_trains(pool, train_split, tmp_path):
    """mobilenetv3_small_050: a hidden head layer makes the pooled pre-logits 1,024 wide, num_features 288."""
    split, _ = train_split
    assert timm.create_model("mobilenetv3_small_050", pretrained=False).num_features == 288
    cfg = tiny_cfg(student="mobilenetv3_small_050", steps=2, checkpoint_every=50)
    student = build_student(cfg, seed=0)
    assert student.head.in_features == models.feature_dim(student.backbone) == 1024
    log = train_student(split, pool, cfg, str(tmp_path / "mnv3"), torch.device("cpu"), seed=0)
    assert log["complete"] and log["steps"] == 2 and np.isfinite(log["loss_curve"]).all()
    assert load_student(str(tmp_path / "mnv3"), cfg).head.in_features == 1024


# ----------------------------------------------------------------------------- resume after a kill
@pytest.mark.numerics
def test_killed_run_resumes_on_the_same_trajectory(pool, train_split, tmp_path):
    split, url = train_split
    cfg = tiny_cfg(steps=6, checkpoint_every=2)
    cpu = torch.device("cpu")
    straight = train_student(split, pool, cfg, str(tmp_path / "straight"), cpu, seed=5)
    assert straight["steps"] == 6 and len(straight["loss_curve"]) == 6

    out = tmp_path / "killed"
    spec = {"ids": [r.id for r in pool.records], "npz": url, "cfg": cfg.model_dump(), "out": str(out),
            "seed": 5, "kill_at": 5}
    proc = run_until_killed(spec, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / STUDENT_FILE).exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004"]  # only the newest is kept

    resumed = train_student(split, pool, cfg, str(out), cpu, seed=5)  # a fresh process state
    np.testing.assert_allclose(resumed["loss_curve"], straight["loss_curve"], rtol=1e-5, atol=1e-7)
    for name in (STUDENT_FILE, HEAD_FILE):
        got, want = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)

    # a finished run is returned as is, without training again
    again = train_student(split, pool, cfg, str(out), cpu, seed=5)
    assert again == json.loads((out / LOG_FILE).read_text()) and again["seconds"] == resumed["seconds"]
    # ... but never reused for another trajectory
    with pytest.raises(StoreError, match="another config"):
        train_student(split, pool, tiny_cfg(steps=6, checkpoint_every=2, lr=5e-4), str(out), cpu, seed=5)


# ----------------------------------------------------------------------------- export + official format
def test_train_on_official_npz_and_export_reloads_in_timm(pool, train_split, tmp_path):
    split, url = train_split
    assert split.n_reordered == 0 and len(split) > 700
    cfg = tiny_cfg(steps=3, grad_accum=2, checkpoint_every=50, num_workers=1)
    out = tmp_path / "run"
    log = train_student(split, pool, cfg, str(out), torch.device("cpu"), seed=0)
    assert log["complete"] and log["steps"] == 3 and np.isfinite(log["loss_curve"]).all()
    assert json.loads((out / LOG_FILE).read_text())["loss_curve"] == log["loss_curve"]

    # the exported backbone is a plain timm state dict
    backbone = timm.create_model(TINY, pretrained=False)
    backbone.load_state_dict(load_file(str(out / STUDENT_FILE)), strict=True)
    head = load_file(str(out / HEAD_FILE))
    assert head["weight"].shape == (32, models.feature_dim(backbone)) and head["bias"].shape == (32,)

    student = load_student(str(out), cfg)
    assert student.image_size == 32
    x = decode_images([r.path for r in pool.records[:4]], eval_transform(backbone, 32))
    with torch.no_grad():
        want = models.pooled_features(backbone.eval(), x) @ head["weight"].T + head["bias"]
        torch.testing.assert_close(student(x), want, rtol=1e-5, atol=1e-5)

    # evaluation embeds each unique image once and scores the dataset's row order
    valid = teacher_triplets(pixel_teacher(pool), 200, seed=9)
    acc = evaluate_student(student, valid, pool, torch.device("cpu"), batch_size=16)
    emb = embed_images(student, [r.path for r in pool.records], torch.device("cpu"))
    sims = pair_similarities(emb, valid.indices)
    assert acc == triplet_accuracy(sims)
    assert 0.0 <= acc <= 1.0
    # a plain timm model is scored on its pooled features
    plain = evaluate_student(backbone, valid, pool, torch.device("cpu"), image_size=32, max_triplets=50)
    assert 0.0 <= plain <= 1.0

    with pytest.raises(StoreError, match="no finished"):
        load_student(str(tmp_path / "nothing"), cfg)


def test_pretrained_lite0_student_decays_toward_its_packaged_weights(pool, train_split, tmp_path):
    split, _ = train_split
    cfg = DistillConfig(head_dim=16, steps=2, batch_triplets=4, lr=1e-4, warmup_steps=0, image_size=64, checkpoint_every=50)
    out = tmp_path / "lite0"
    train_student(split, pool, cfg, str(out), torch.device("cpu"), seed=0)
    lite0 = models.create_model("tf_efficientnet_lite0", "packaged")
    first, _ = next(lite0.named_parameters())  # the student's parameter 0 is the backbone's first
    packaged = lite0.state_dict()
    state = torch.load(out / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    torch.testing.assert_close(state["optimizer"]["state"][0]["init"], packaged[first])
    trained = load_file(str(out / STUDENT_FILE))
    delta = (trained[first] - packaged[first]).abs().max()
    assert 0 < delta < 1e-3  # moved, a little, from the pretrained weights


# ----------------------------------------------------------------------------- learning
def test_distillation_raises_held_out_triplet_accuracy(pool, teacher, train_split, tmp_path):
    split, _ = train_split
    held_out = teacher_triplets(teacher, 400, seed=2)
    cfg = tiny_cfg(steps=20, batch_triplets=16, lr=3e-3, warmup_steps=2, checkpoint_every=100)
    cpu = torch.device("cpu")
    before = evaluate_student(build_student(cfg, 0), held_out, pool, cpu)
    log = train_student(split, pool, cfg, str(tmp_path / "learn"), cpu, seed=0)
    after = evaluate_student(load_student(str(tmp_path / "learn"), cfg), held_out, pool, cpu)
    assert np.mean(log["loss_curve"][-5:]) < np.mean(log["loss_curve"][:5])
    assert after >= before + 0.12, (before, after)


@pytest.mark.slow
def test_compiled_student_follows_the_eager_trajectory(pool, train_split, tmp_path):
    """distill.compile: the same steps through torch.compile (inductor, on this CPU) give the
    eager run's loss curve and weights within float tolerance."""
    split, _ = train_split
    cpu = torch.device("cpu")
    eager = train_student(split, pool, tiny_cfg(steps=3), str(tmp_path / "eager"), cpu, seed=1)
    compiled = train_student(split, pool, tiny_cfg(steps=3, compile=True), str(tmp_path / "compiled"), cpu, seed=1)
    np.testing.assert_allclose(compiled["loss_curve"], eager["loss_curve"], rtol=1e-3, atol=1e-5)
    a = load_file(str(tmp_path / "eager" / HEAD_FILE))
    b = load_file(str(tmp_path / "compiled" / HEAD_FILE))
    torch.testing.assert_close(b["weight"], a["weight"], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- the last blocks only
def test_training_the_last_blocks_leaves_the_front_as_it_was_and_resumes(pool, train_split, tmp_path):
    """`distill.train_blocks`: the front's weights and BatchNorm statistics are exported as they were built,
    the last blocks, head layers and head move, and a run killed after a checkpoint (the front's outputs
    computed again by the fresh process) resumes on the uninterrupted trajectory."""
    split, url = train_split
    cfg = tiny_cfg(student="tf_efficientnet_lite0", train_blocks=3, steps=4, checkpoint_every=2, lr=3e-3)
    cpu = torch.device("cpu")
    log = train_student(split, pool, cfg, str(tmp_path / "straight"), cpu, seed=3)
    assert 0 < log["trained_parameters"] < log["parameters"]
    built = build_student(cfg, 3).backbone.state_dict()
    trained = load_file(str(tmp_path / "straight" / STUDENT_FILE))
    moved = {k for k in built if not torch.equal(built[k], trained[k])}
    front = {k for k in built if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.",
                                               "blocks.3.", "blocks.4."))}  # Lite0's first 13 of 16 blocks
    assert front and not moved & front
    assert any(k.startswith("blocks.6.") for k in moved) and any(k.startswith("conv_head.") for k in moved)

    out = tmp_path / "killed"
    spec = {"ids": [r.id for r in pool.records], "npz": url, "cfg": cfg.model_dump(), "out": str(out),
            "seed": 3, "kill_at": 3}
    proc = run_until_killed(spec, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = train_student(split, pool, cfg, str(out), cpu, seed=3)
    np.testing.assert_allclose(resumed["loss_curve"], log["loss_curve"], rtol=1e-5, atol=1e-7)
    for name in (STUDENT_FILE, HEAD_FILE):
        got, want = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
