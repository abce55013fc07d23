"""Synthetic proof of stage 1: VICE and the gLocal transform against a known generating model.

    python -m benchmarks.alignment --quick

Generates synthetic "human" triplets from a sparse non-negative embedding (`alignet_core.synthetic`),
holds out 10% of the triplets, then measures on them: the generating model's own accuracy
(ceiling), the teacher zero-shot, the best affine readout of the generating embedding from the
teacher's features (`linear_oracle_acc`: least squares knowing the embedding, the most a linear
map can recover from this noisy teacher), VICE fitted on the training triplets, the transform fitted
with VICE's posterior-predictive probabilities as soft targets (uncertainty distillation) and
with hard targets, the k-NN overlap of the objects before/after a global-only vs a gLocal fit,
and calibration (NLL / ECE of the held-out choices) of soft vs hard targets. Prints one JSON line
and writes benchmarks/results/alignment_quick.json (or alignment.json without --quick).

    python -m benchmarks.alignment --demo [--root /tmp/alignet-bench-root]

The same claims on the demo's real teacher (the demo config: Noto emoji, tf_efficientnet_lite2
with its packaged weights) and its taxonomy-derived *proxy* triplets (not human data): the
embeddings come from `run_embed` (cached under --root), the triplets and their generating
probabilities from `load_human_data`, split as the transform stage splits them. Writes
benchmarks/results/alignment_demo.json.

    python -m benchmarks.alignment --mixes [--root /tmp/alignet-bench-root]

What the taxonomy proxy's mix of levels does to each level's figures (`run_mixes`). Writes
benchmarks/results/alignment_mixes.json.

This module is the command line; the synthetic runs are in `benchmarks/alignment_synthetic.py`, the demo's
and the mixes' in `benchmarks/alignment_demo.py`.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._machine import machine_info, write_result
from benchmarks.alignment_demo import DEMO_LONGER_EPOCHS, DEMO_ROOT, DEMO_VICE_EPOCHS, run_demo, run_mixes
from benchmarks.alignment_synthetic import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small synthetic problem (a few minutes on a laptop CPU)")
    mode.add_argument("--demo", action="store_true", help="the demo teacher and its taxonomy proxy triplets")
    mode.add_argument("--mixes", action="store_true", help="the demo transform fitted on proxies of each level mix")
    parser.add_argument("--seed", type=int, default=None, help="synthetic modes: default 0; --demo: the config's seed")
    parser.add_argument("--root", default=DEMO_ROOT, help="--demo: artifact root caching the teacher embeddings")
    parser.add_argument("--vice-epochs", type=int, default=DEMO_VICE_EPOCHS, help="--demo: VICE passes")
    parser.add_argument(
        "--longer-epochs", type=int, default=DEMO_LONGER_EPOCHS, help="--demo: epochs of the extra hard/soft fits (0: skip)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    # one thread is fastest on a shared 2-core CPU, for the synthetic problem and the demo's 1280-d W alike
    torch.set_num_threads(args.threads)
    try:
        if args.demo:
            result = run_demo(args.root, args.vice_epochs, args.seed, args.longer_epochs)
        elif args.mixes:
            result = run_mixes(args.root, args.seed)
        else:
            result = run(args.quick, 0 if args.seed is None else args.seed)
    finally:
        torch.set_num_threads(threads)
    result["machine"] = machine_info()
    write_result(result["benchmark"], result)


if __name__ == "__main__":
    main()
