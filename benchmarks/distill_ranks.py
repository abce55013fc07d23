"""Data-parallel distillation: training steps per second on 1 and on N ranks, same global batch.

    python -m benchmarks.distill_ranks           # CPU: 1 process vs 2 gloo ranks on this machine
    python -m benchmarks.distill_ranks --gpu     # every CUDA GPU of the machine: 1 GPU vs N GPUs (NCCL)
    python -m benchmarks.distill_ranks --gpu --dry-run --repeats 1   # the GPU mode's code on 2 CPU ranks

CPU mode: the demo student (packaged EfficientNet-Lite0, 64 px, images decoded once and kept in memory),
16 triplets per step, on three set-ups run alternately (so load on a shared machine hits all three):
`one_rank_1_thread` (`train_student` in this process on one CPU thread: one rank's share of the machine),
`one_rank_all_threads` (the same on every usable core: what a single process gets here), and `two_ranks`
(the stage's launcher: torchrun, two gloo ranks, `hardware.rank_threads` threads each, 8 triplets per
rank per step). Steps/s come from the training-loop time rank 0 logs (setup, the one-off decode and the
export excluded; the launcher's start-up is reported apart as `*_wall_s`). Medians over the repeats:
`efficiency` = two_ranks ÷ (2 × one_rank_1_thread), the scaling efficiency at equal resources per rank
(target ≥ 0.8 on a machine with a core per rank); `speedup_vs_one_process` = two_ranks ÷
one_rank_all_threads, what splitting this machine into ranks buys over one process using all of it.
`independent_halves`: two independent 1-thread processes training at once, each on half the batch, no
communication (the ranks' computation alone): `machine_ceiling` = its steps/s ÷ (2 × one_rank_1_thread),
what this machine's cores allow two ranks at best (shared caches, memory bandwidth, a virtual machine's
cores), and `efficiency_vs_ceiling` = two_ranks ÷ independent_halves, what DDP itself costs.
Wall time on a shared machine moves with other load, so `cpu_efficiency` also compares the CPU time of a
step (rank 0's process, all its threads): one rank's share against the whole step in one process, halved
(1.0 when splitting the batch adds no work: the all-reduce, per-rank overheads).

GPU mode (needs a machine with at least two CUDA GPUs; not run on this project's GPU-less machine): a
random-init ViT-B/16 student at 224 px (no download), 512 triplets per step in bf16 autocast, 1 GPU with
grad_accum N (micro-batches of 512/N triplets) against N GPUs with one micro-batch each: the same
micro-batch size per GPU, so `efficiency` = N-GPU steps/s ÷ (N × 1-GPU steps/s) is strong scaling at equal
work per device. `--dry-run` runs that code on two CPU ranks with a tiny ViT and writes nothing. Writes
`benchmarks/results/distill_ranks.json` (CPU) or `distill_ranks_gpu.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from typing import Any

import numpy as np
import torch

from alignet_core.config import PipelineConfig, parse_config
from alignet_core.distill.launch import train_on_ranks
from alignet_core.distill.train import train_student
from alignet_core.hardware import autocast_dtype, process_group_backend, rank_threads, torch_threads
from alignet_core.io import formats, sources
from alignet_core.io.dataset_splits import read_split
from benchmarks._machine import machine_info, write_result


def _dataset(folder: str, n_images: int, n: int, seed: int) -> tuple[str, sources.ImageSource]:
    """Random triplets over the first-n_images demo subset, teacher similarities random, odd one last,
    written in the official format: (url, source)."""
    src = sources.subset(sources.demo_source(), n_images)
    g = np.random.default_rng(seed)
    idx = np.stack([g.choice(len(src), 3, replace=False) for _ in range(n)])
    idx, sims, _ = formats.order_by_similarity(idx, g.normal(size=(n, 3)).astype(np.float32))
    url = f"{folder}/train_bench.npz"
    formats.write_alignet_npz(url, idx, src.ids()[idx], sims.astype(np.float32))
    return url, src


Timing = tuple[float, float, float]  # (training-loop seconds, its CPU seconds (rank 0's), wall seconds)


def _one_process(cfg: PipelineConfig, url: str, src: sources.ImageSource, device: torch.device) -> Timing:
    """The timings of one run in this process, in a fresh directory."""
    split = read_split(url, src, "indices")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        log = train_student(split, src, cfg.distill, out, device, cfg.seed)
        return float(log["seconds"]), float(log["cpu_seconds"]), time.perf_counter() - t0


def _ranks(cfg: PipelineConfig, url: str) -> Timing:
    """The timings of one launched run (rank 0's loop; the wall time includes torchrun's start)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        log = train_on_ranks(cfg, url, out)
        assert log["ranks"] == len(cfg.distill.devices or [])
        return float(log["seconds"]), float(log["cpu_seconds"]), time.perf_counter() - t0


def _half_process(cfg_data: dict[str, Any], url: str, n_images: int, start: Any, out: Any) -> None:
    """One of `_independent_pair`'s processes: a 1-thread run in this process once both are ready."""
    torch.set_num_threads(1)
    src = sources.subset(sources.demo_source(), n_images)
    start.wait()
    out.put(_one_process(parse_config(cfg_data), url, src, torch.device("cpu")))


def _independent_pair(cfg_data: dict[str, Any], url: str, n_images: int) -> Timing:
    """Two independent 1-thread processes training at once (each `cfg_data`: half the batch), no
    communication: the ranks' computation alone, so its steps/s is what this machine allows two ranks.
    The timings of the slower one."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_half_process, args=(cfg_data, url, n_images, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    timings = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return max(timings)


def _summary(name: str, steps: int, runs: list[Timing]) -> dict[str, Any]:
    loop_s, cpu_s, wall_s = (list(x) for x in zip(*runs))
    return {f"{name}_s": [round(x, 3) for x in loop_s], f"{name}_cpu_s": [round(x, 3) for x in cpu_s],
            f"{name}_wall_s": [round(x, 3) for x in wall_s],
            f"{name}_steps_per_s": round(steps / float(np.median(loop_s)), 3)}


def _median(runs: list[Timing], k: int) -> float:
    return float(np.median([r[k] for r in runs]))


def run_cpu(steps: int, repeats: int, n_images: int = 600, seed: int = 0) -> dict[str, Any]:
    cores = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        url, src = _dataset(folder, n_images, 4000, seed)
        base = {"source": {"limit": n_images}, "seed": seed, "device": "cpu",
                "distill": {"student": "tf_efficientnet_lite0", "weights": "packaged", "steps": steps,
                            "batch_triplets": 16, "image_size": 64, "warmup_steps": max(1, steps // 10),
                            "lr": 3e-4, "checkpoint_every": steps, "cache_images": True}}
        one = parse_config(base)
        two = parse_config({**base, "distill": {**base["distill"], "devices": ["cpu", "cpu"]}})
        cpu = torch.device("cpu")
        with torch_threads(1):  # first-call costs out of the timings
            _one_process(parse_config({**base, "distill": {**base["distill"], "steps": 2}}), url, src, cpu)
        half = {**base, "distill": {**base["distill"], "batch_triplets": 8}}
        runs: dict[str, list[Timing]] = {k: [] for k in ("one_rank_1_thread", "one_rank_all_threads", "two_ranks",
                                                         "independent_halves")}
        for _ in range(repeats):
            for name in runs:
                if name == "two_ranks":
                    runs[name].append(_ranks(two, url))
                elif name == "independent_halves":
                    runs[name].append(_independent_pair(half, url, n_images))
                else:
                    with torch_threads(1 if name == "one_rank_1_thread" else cores):
                        runs[name].append(_one_process(one, url, src, cpu))
    result: dict[str, Any] = {
        "benchmark": "distill_ranks", "mode": "cpu", "backend": "gloo",
        "student": "tf_efficientnet_lite0", "image_size": 64, "batch_triplets": 16, "steps": steps,
        "pool_images": n_images, "repeats": repeats,
        "order": "alternating (1 thread, all threads, 2 ranks, independent halves) × repeats",
        "torch_threads_all": cores, "threads_per_rank": rank_threads(cpu, 2),
    }
    for name, timings in runs.items():
        result.update(_summary(name, steps, timings))
    one_1, two_ = runs["one_rank_1_thread"], runs["two_ranks"]
    result["efficiency"] = round(_median(one_1, 0) / _median(two_, 0) / 2, 3)  # (steps/two) / (2 · steps/one)
    result["speedup_vs_one_process"] = round(_median(runs["one_rank_all_threads"], 0) / _median(two_, 0), 3)
    result["efficiency_per_repeat"] = [round(a[0] / b[0] / 2, 3) for a, b in zip(one_1, two_)]
    # CPU time a step costs, one rank's share against the whole step in one process: 1.0 when splitting the
    # batch adds no work (gradient all-reduce, per-rank overheads); unlike wall time, unmoved by other load
    result["cpu_efficiency"] = round(_median(one_1, 1) / _median(two_, 1) / 2, 3)
    # what this machine allows at best: two independent 1-thread processes, each half a step, no communication
    result["machine_ceiling"] = round(_median(one_1, 0) / _median(runs["independent_halves"], 0) / 2, 3)
    result["efficiency_vs_ceiling"] = round(_median(runs["independent_halves"], 0) / _median(two_, 0), 3)
    result["target_efficiency"] = 0.8
    result["torch"] = torch.__version__
    result["machine"] = machine_info()
    return result


def run_gpu(steps: int, repeats: int, dry_run: bool = False, seed: int = 0) -> dict[str, Any]:
    """1 GPU (grad_accum N) vs every GPU of the machine (N NCCL ranks), same global batch and micro-batch size.
    dry_run: the same code on two CPU ranks with a tiny ViT (`test_vit`, 32 px, 16 triplets, 60 images): a
    check that it runs, not a GPU result."""
    if dry_run:
        devices, student, image_size, batch, n_images = ["cpu", "cpu"], "test_vit", 32, 16, 60
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            raise SystemExit(f"--gpu needs a machine with at least 2 CUDA GPUs; torch sees {count} "
                             "(--dry-run runs its code on two CPU ranks)")
        devices, student, image_size, batch, n_images = [f"cuda:{i}" for i in range(count)], "vit_base_patch16_224", \
            224, 512 - 512 % count, 1906
    n = len(devices)
    with tempfile.TemporaryDirectory() as folder:
        url, src = _dataset(folder, n_images, 20 * batch, seed)
        base = {"source": {"limit": n_images}, "seed": seed, "device": devices[0].split(":")[0],
                "distill": {"student": student, "weights": None, "steps": steps, "image_size": image_size,
                            "batch_triplets": batch, "warmup_steps": max(1, steps // 10), "lr": 3e-5,
                            "checkpoint_every": steps, "cache_images": True, "num_workers": 0 if dry_run else 4}}
        one = parse_config({**base, "distill": {**base["distill"], "grad_accum": n}})
        many = parse_config({**base, "distill": {**base["distill"], "devices": devices}})
        first = torch.device(devices[0])
        _one_process(parse_config({**base, "distill": {**base["distill"], "grad_accum": n, "steps": 2}}), url, src,
                     first)
        runs: dict[str, list[Timing]] = {"one_device": [], "all_devices": []}
        for _ in range(repeats):  # alternating
            runs["one_device"].append(_one_process(one, url, src, first))
            runs["all_devices"].append(_ranks(many, url))
    result: dict[str, Any] = {
        "benchmark": "distill_ranks", "mode": "gpu (dry run on CPU ranks: not a GPU result)" if dry_run else "gpu",
        "backend": process_group_backend(first), "devices": n,
        "device_name": torch.cuda.get_device_name(0) if first.type == "cuda" else "cpu",
        "student": f"{student} (random init)", "image_size": image_size, "batch_triplets": batch,
        "micro_batch_triplets": batch // n, "steps": steps, "repeats": repeats,
        "autocast": str(autocast_dtype(first) or "float32").removeprefix("torch."),
    }
    for name, timings in runs.items():
        result.update(_summary(name, steps, timings))
    result["efficiency"] = round(_median(runs["one_device"], 0) / _median(runs["all_devices"], 0) / n, 3)
    result["target_efficiency"] = 0.8
    result["torch"] = torch.__version__
    result["machine"] = machine_info()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="1 GPU vs every GPU of the machine (needs at least 2)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu: its code on two CPU ranks, nothing written")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (CPU: 40, GPU: 50)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.gpu and args.dry_run:
        print(json.dumps(run_gpu(args.steps or 2, args.repeats, dry_run=True)))
    elif args.gpu:
        write_result("distill_ranks_gpu", run_gpu(args.steps or 50, args.repeats))
    else:
        write_result("distill_ranks", run_cpu(args.steps or 40, args.repeats))


if __name__ == "__main__":
    main()
