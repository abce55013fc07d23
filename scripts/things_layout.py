"""Write a small THINGS-layout data set from the shipped emoji, to try the real-data path end to end.

    python scripts/things_layout.py OUT [--concepts 40] [--images-per-concept 3] [--triplets 8000]

Output, laid out as the THINGS files are (docs/your-data.md):
    OUT/object_images/<concept>/<concept>_NNb.jpg   several JPEGs per concept (concept = emoji subcategory)
    OUT/object_images/<concept>/<concept>.jpg       the concept's triplet-task image (a copy of _01b;
                                                    human.stimulus: triplet_image, the default)
    OUT/unique_id.txt                               the concepts in "THINGS order" (shuffled, not sorted),
                                                    with one concept, 'aardvark', that has no images
    OUT/triplets/trainset.txt                       odd-one-out triplets 'i j k' over concept indices, k odd
                                                    (1% name 'aardvark': the validation drops them)
    OUT/triplets/probabilities.npy                  (n, 3) choice probabilities of the pairs (i,j), (i,k), (j,k)

The triplets are a synthetic stand-in for human choices: i and j from one emoji category, k from
another, with a fraction `--noise` of the choices flipped. They are not human data; anything fitted
on them measures the plumbing, not human alignment.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import PIL.Image

from alignet_core.io.sources import demo_data_dir

MISSING = "aardvark"  # a concept of the order file with no image folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--concepts", type=int, default=40, help="concepts with images (emoji subcategories)")
    ap.add_argument("--images-per-concept", type=int, default=3)
    ap.add_argument("--triplets", type=int, default=8000)
    ap.add_argument("--noise", type=float, default=0.1, help="fraction of choices flipped")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with open(demo_data_dir() / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_concept: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_concept[r["subcategory"]].append(r)
    eligible = sorted(c for c, rs in by_concept.items() if len(rs) >= args.images_per_concept)
    chosen = [eligible[i] for i in np.sort(rng.choice(len(eligible), args.concepts, replace=False))]
    for concept in chosen:
        folder = args.out / "object_images" / concept
        folder.mkdir(parents=True, exist_ok=True)
        for k, r in enumerate(by_concept[concept][: args.images_per_concept]):
            img = PIL.Image.open(demo_data_dir() / "images" / r["image"]).convert("RGBA")
            flat = PIL.Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img, mask=img.getchannel("A"))
            flat.save(folder / f"{concept}_{k + 1:02d}b.jpg", quality=92)
            if k == 0:
                flat.save(folder / f"{concept}.jpg", quality=92)  # the image shown in the triplet task
    order = [chosen[i] for i in rng.permutation(len(chosen))]
    order.insert(len(order) // 3, MISSING)
    (args.out / "unique_id.txt").write_text("\n".join(order) + "\n")
    category = {c: by_concept[c][0]["category"] for c in chosen}
    cats = np.asarray([category.get(c, "") for c in order])
    triplets, probs = [], []
    while len(triplets) < args.triplets:
        i, j, k = rng.choice(len(order), 3, replace=False)
        if not cats[i] or not cats[j] or not cats[k] or cats[i] != cats[j] or cats[k] == cats[i]:
            continue
        p = np.array([1 - args.noise, args.noise / 2, args.noise / 2])  # over (i,j), (i,k), (j,k)
        choice = rng.choice(3, p=p)
        row, perm = [(i, j, k), (i, k, j), (j, k, i)][choice], [[0, 1, 2], [1, 0, 2], [2, 0, 1]][choice]
        triplets.append(row)
        probs.append(p[perm])
    missing = order.index(MISSING)  # ~1% of the rows name the concept without images, as a partial tree would
    for t in range(0, len(triplets), 100):
        triplets[t] = (triplets[t][0], triplets[t][1], missing)
    (args.out / "triplets").mkdir(parents=True, exist_ok=True)
    (args.out / "triplets" / "trainset.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in triplets))
    np.save(args.out / "triplets" / "probabilities.npy", np.asarray(probs, dtype=np.float64))
    print(f"{args.out}: {len(chosen)} concepts with {args.images_per_concept} images each, "
          f"{len(order)} in unique_id.txt ('{MISSING}' without images), {len(triplets)} triplets")


if __name__ == "__main__":
    main()
