"""Does the harmonizer move where the student looks, without costing what it judges similar? And
what does its double backward cost per step?

    python -m benchmarks.harmonize              # writes benchmarks/results/harmonize.json
    python -m benchmarks.harmonize --no-write   # the same, printed only

Set-up (the demo's student and images, a cheaper teacher than the demo pipeline's, and a run scaled to
what a shared 2-core CPU can do: the double backward through EfficientNet-Lite's depthwise
convolutions costs several plain steps on a CPU): `--pool` demo emoji drawn with a seed, split by
image into training (80%) and held-out (20%) images. The teacher is the packaged EfficientNet-Lite2's
pooled features at 128 px (cosine similarity, no human transform: the stages before distillation are
not what is measured here); training triplets over the training images and held-out triplets over
the held-out images are ordered by it (odd one out last), similarities scaled to std 3. Two
students train from the same packaged EfficientNet-Lite0 (`--image-size`, `--batch` triplets a
step, `--steps`, `--lr`; the demo's are 64 px, 16, 120, 3e-4): plain AligNet, and AligNet +
`distill.harmonize` (weight 1, 5 levels, `maps: proxy`).

Measured on the held-out images, for the pretrained student and both finetuned ones:
- saliency–map Spearman (and IoU/Dice of the top 10%) against the **proxy maps** (blurred alpha
  silhouettes: where the object is, not what humans find diagnostic), saliency = max |∂ logit /
  ∂ pixel| of each model's own top-1 ImageNet class; means with bootstrap 95% intervals and the
  paired changes harmonized − pretrained and harmonized − plain;
- triplet accuracy against the teacher on the held-out triplets, with its 95% interval.
Step cost: one training step (forward, AligNet loss, backward; with the harmonizer its saliency
and double backward) on the same batch, timed alternately plain / harmonized `--reps` times in this
process; `cost_ratio` = median harmonized ÷ median plain seconds. The training runs' own loop times
are reported too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import numpy as np
import torch

from alignet_core.config.distill import DistillConfig, HarmonizeConfig
from alignet_core.distill.evaluation import student_outcomes
from alignet_core.distill.harmonizer import training_harmonizer
from alignet_core.distill.objective import alignet_loss, triplet_similarities
from alignet_core.distill.train import train_student
from alignet_core.evaluate.saliency import per_image_scores, student_saliency, summarize
from alignet_core.io import formats, sources
from alignet_core.io.importance_maps import PROXY_NAME
from alignet_core.models import factory as models
from alignet_core.models.embedding import decode_images, embed_images
from alignet_core.models.student import build_student, eval_transform, load_student
from alignet_core.stats import bootstrap
from alignet_core.stats.bootstrap import mean_interval
from benchmarks._machine import machine_info, write_result


def ordered_triplets(emb: np.ndarray, rows: np.ndarray, n: int, seed: int) -> formats.AlignetTriplets:
    """n random triplets of `rows` ordered by cosine similarity of emb (odd one out last), sims scaled to std 3."""
    g = np.random.default_rng(seed)
    idx = np.stack([g.choice(rows, 3, replace=False) for _ in range(n)])
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    a, b, c = e[idx[:, 0]], e[idx[:, 1]], e[idx[:, 2]]
    s = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], 1)
    s = (s - s.mean()) / s.std() * 3.0
    idx, s, _ = formats.order_by_similarity(idx, s)
    strict = (s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])
    names = np.full(idx[strict].shape, "", dtype=str)
    return formats.AlignetTriplets(idx[strict], names, s[strict].astype(np.float32))


def step_seconds(cfg: DistillConfig, train: formats.AlignetTriplets, src: sources.ImageSource, reps: int) -> dict:
    """Alternate plain and harmonized training steps on one batch; seconds per step of each."""
    student = build_student(cfg, 0).train()
    transform = eval_transform(student.backbone, student.image_size)
    harm = training_harmonizer(cfg, train, src, transform)
    idx = train.indices[:cfg.batch_triplets]
    unique, inverse = np.unique(idx, return_inverse=True)
    images = decode_images([src.records[int(u)].path for u in unique], transform)
    rows = torch.from_numpy(inverse.reshape(idx.shape).astype(np.int64))
    sims = torch.from_numpy(train.similarities[:cfg.batch_triplets])
    pool_rows = torch.from_numpy(unique)
    times: dict[str, list[float]] = {"plain": [], "harmonized": []}
    for r in range(reps + 1):  # the first round warms up
        for kind in ("plain", "harmonized"):
            student.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if kind == "plain":
                out = student(images)
                loss = alignet_loss(triplet_similarities(out, rows), sims)
            else:
                out, term = harm.forward(student, images, pool_rows)  # type: ignore[union-attr]
                loss = alignet_loss(triplet_similarities(out, rows), sims) + term
            loss.backward()
            if r:
                times[kind].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"plain_s": round(med["plain"], 4), "harmonized_s": round(med["harmonized"], 4),
            "cost_ratio": round(med["harmonized"] / med["plain"], 3), "reps": reps,
            "unique_images_per_step": int(len(unique)),
            "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=200, help="demo images used")
    ap.add_argument("--steps", type=int, default=12, help="training steps of each student (the demo runs 120)")
    ap.add_argument("--batch", type=int, default=4, help="triplets per step (the demo's 16)")
    ap.add_argument("--image-size", type=int, default=32, help="student input pixels (the demo's 64)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the demo's 3e-4)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print the result, do not write it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    demo = sources.demo_source()
    pick = np.sort(np.random.default_rng(args.seed).choice(len(demo), args.pool, replace=False))
    src = sources.ImageSource(tuple(demo.records[i] for i in pick), f"demo subset ({args.pool})")
    order = np.random.default_rng(args.seed + 1).permutation(args.pool)
    n_train = int(0.8 * args.pool)
    train_rows, held_rows = np.sort(order[:n_train]), np.sort(order[n_train:])

    t0 = time.perf_counter()
    teacher = models.create_model("tf_efficientnet_lite2", "packaged")
    temb = embed_images(teacher, src.paths(), cpu, 64, image_size=128)
    del teacher
    train = ordered_triplets(temb, train_rows, args.n_train, args.seed + 2)
    held = ordered_triplets(temb, held_rows, args.n_heldout, args.seed + 3)
    teacher_s = time.perf_counter() - t0

    base = dict(student="tf_efficientnet_lite0", weights="packaged", image_size=args.image_size,
                batch_triplets=args.batch, steps=args.steps, warmup_steps=max(1, args.steps // 10), lr=args.lr,
                checkpoint_every=10**6)
    plain_cfg = DistillConfig(**base)
    harm_cfg = DistillConfig(**base, harmonize=HarmonizeConfig(weight=1.0, levels=5, maps="proxy"))

    logging.info("teacher and triplets: %.1f s", teacher_s)
    cost = step_seconds(harm_cfg, train, src, args.reps)
    logging.info("step cost: %s", {k: cost[k] for k in ("plain_s", "harmonized_s", "cost_ratio")})

    out: dict = {}
    students = {"pretrained": build_student(plain_cfg, args.seed)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in (("plain", plain_cfg), ("harmonized", harm_cfg)):
            log = train_student(train, src, cfg, f"{tmp}/{name}", cpu, args.seed,
                                progress=lambda i, loss, name=name: logging.info("%s step %d loss %.4f", name, i, loss))
            out[f"{name}_train"] = {"loop_s": log["seconds"], "s_per_step": round(log["seconds"] / cfg.steps, 3),
                                    "final_loss": log["final_loss"]}
            students[name] = load_student(f"{tmp}/{name}", cfg)

    scores, accuracy, correct = {}, {}, {}
    for name, st in students.items():
        sal, human, rows = student_saliency(st, src, held_rows, "proxy", cpu)
        scores[name] = per_image_scores(sal, human)
        res = student_outcomes(st, {"held": held}, None, src, cpu, use_head=name != "pretrained",
                               similarities=("cosine",) if name == "pretrained" else ("dot",))
        correct[name] = next(iter(res.values())).by_sampling["held"]
        accuracy[name] = bootstrap.accuracy(correct[name], args.seed)
    where = {name: summarize(s, args.seed).model_dump() for name, s in scores.items()}
    change = {
        "harmonized_minus_pretrained": mean_interval(scores["harmonized"]["spearman"] - scores["pretrained"]["spearman"],
                                                     args.seed).model_dump(),
        "harmonized_minus_plain": mean_interval(scores["harmonized"]["spearman"] - scores["plain"]["spearman"],
                                                args.seed).model_dump(),
        "plain_minus_pretrained": mean_interval(scores["plain"]["spearman"] - scores["pretrained"]["spearman"],
                                                args.seed).model_dump(),
    }
    acc_h, acc_p = accuracy["harmonized"], accuracy["plain"]
    result = {
        "benchmark": "harmonize",
        "maps": PROXY_NAME,
        "saliency": "max over channels of |d logit[top-1 of each model] / d pixel| (the reference's evaluation)",
        "setup": {"pool": args.pool, "train_images": int(len(train_rows)), "heldout_images": int(len(held_rows)),
                  "train_triplets": int(len(train)), "heldout_triplets": int(len(held)), "steps": args.steps,
                  "teacher": "tf_efficientnet_lite2 packaged, pooled features at 128 px, cosine",
                  "student": f"tf_efficientnet_lite0 packaged at {args.image_size} px, batch {args.batch} triplets, "
                             f"lr {args.lr}",
                  "harmonize": harm_cfg.harmonize.model_dump(), "teacher_s": round(teacher_s, 1)},
        "spearman_vs_proxy_maps": where,
        "spearman_change": change,
        "triplet_accuracy": {k: v.model_dump() for k, v in accuracy.items()},
        "harmonized_accuracy_within_plain_ci": bool(acc_p.low <= acc_h.value <= acc_p.high),
        "spearman_raised_ci_excludes_zero": bool(change["harmonized_minus_pretrained"]["low"] > 0),
        "step_cost": cost,
        **out,
        "machine": machine_info(),
    }
    if args.no_write:
        print(json.dumps(result))
    else:
        write_result("harmonize", result)


if __name__ == "__main__":
    main()
