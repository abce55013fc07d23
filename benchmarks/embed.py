"""Our extraction engine vs a plain thingsvision-style loop, same model, same images, same batch size;
and (`--gpu`) the extraction's GPU throughput against the model's own speed.

    python -m benchmarks.embed --quick     # packaged tf_efficientnet_lite0, 256 demo emoji, batch 32
    python -m benchmarks.embed --gpu [--compile] [--decode torchvision]   # ViT-B/16 on a CUDA GPU

Baseline (what users write with thingsvision's extractor): the main thread decodes each image with PIL
(through `load_image`, so both sides see the same RGB pixels: the emoji are RGBA and a bare
`.convert("RGB")` would give other features) and applies the timm eval transform one by one, the model runs in float32 NCHW under
`torch.no_grad()`, each batch goes back through `.cpu().numpy()` into a list that is concatenated and
`np.save`d at the end.

Ours: `alignet_core.embed.extract.extract_embeddings` into a temporary Zarr store (decode + transform in
DataLoader workers, channels_last, `torch.inference_mode`, chunked writes with resume markers and
provenance). Both get one warm-up forward of one batch first; times are wall-clock from the first
image opened to the last row on disk. `ratio` = ours / baseline images/s. The two feature arrays are
compared (`max_abs_diff`) so a speed-up can never come from computing something else.

Runs alternate (baseline, ours, baseline, ours, ...) and each rate is the median over `--repeats`,
so a change in the machine's load during the run hits both sides alike; the load average before
and after is recorded. Writes `benchmarks/results/embed_quick.json` and prints one JSON line.

GPU mode (`--gpu`; timm `vit_base_patch16_224`, random init, 224 px, bf16 autocast, channels_last,
`--compile` for torch.compile), both through the extraction's own forward (`embed._Extractor`):
(a) synthetic: one in-memory batch on the GPU, forward only, synchronised at the end → images/s,
    and model FLOP utilisation = images/s × FLOPs per image (counted by
    `torch.utils.flop_counter.FlopCounterMode` on one batch) / the GPU's peak dense bf16 FLOP/s
    (`benchmarks._machine.PEAK_BF16_DENSE`, by device name; `--peak-flops` overrides, and is needed for GPUs not in it);
(b) end to end: `--images` 224-px JPEGs written once to a folder on disk, embedded by
    `extract_embeddings` (DataLoader workers, pinned memory, Zarr writes) → images/s in the steady
    state (from the first finished chunk to the last, so model build and compilation are left out;
    the wall time with them is reported too) and its ratio to (a); the target is ≥ 0.8.
It refuses to run without CUDA. `--device cpu` runs the very same code on the CPU (e.g. with
`--model test_vit --images 128 --batch-size 8`) to check it works; such a run is printed, never
written as a result. GPU runs write `benchmarks/results/gpu/embed_gpu[_compile][_torchvision].json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# torch's OpenMP threads spin while waiting by default; with DataLoader workers on the same cores
# (and other tenants) the spinning threads steal the decoders' time. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import timm
import torch

from alignet_core.config.embed import EmbedConfig
from alignet_core.embed.extract import extract_embeddings
from alignet_core.embed.extractor import _Extractor, _inference_model
from alignet_core.io.embedding_store import open_embeddings
from alignet_core.io.images import load_image
from alignet_core.io.sources import ImageSource, demo_source, folder_source, subset
from alignet_core.models.factory import build_transform, create_model, pooled_features
from benchmarks._machine import (
    check_gpu_device,
    machine_info,
    peak_bf16_flops,
    report_gpu_result,
    synchronize,
    write_result,
)

CPU = torch.device("cpu")


def baseline_loop(model: torch.nn.Module, paths: list[str], batch_size: int, out_path: str) -> np.ndarray:
    """The thingsvision-style loop: main-thread PIL decode + transform per image, fp32, one array saved at the end.

    Returns features (n, p) float32.
    """
    transform = build_transform(model)
    feats = []
    with torch.no_grad():
        for b in range(0, len(paths), batch_size):
            x = torch.stack([transform(load_image(p)) for p in paths[b : b + batch_size]])
            feats.append(pooled_features(model, x).cpu().numpy())
    out = np.concatenate(feats)
    np.save(out_path, out)
    return out


def _warm_up(model: torch.nn.Module, source: ImageSource, batch_size: int, channels_last: bool) -> None:
    transform = build_transform(model)
    x = torch.stack([transform(load_image(p)) for p in source.paths()[:batch_size]])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        pooled_features(model, x)


def run(model_name: str, n: int, batch_size: int, num_workers: int, repeats: int) -> dict:
    source = subset(demo_source(), n)
    cfg = EmbedConfig(model=model_name, weights="packaged", batch_size=batch_size, chunk_rows=4 * batch_size,
                      num_workers=num_workers, store_dtype="float32")
    base_model = create_model(model_name, "packaged")
    our_model = create_model(model_name, "packaged")
    _warm_up(base_model, source, batch_size, channels_last=False)
    _warm_up(our_model, source, batch_size, channels_last=True)
    load_before = [round(v, 2) for v in os.getloadavg()]

    base_s, ours_s = [], []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        for r in range(repeats):
            t0 = time.perf_counter()
            base = baseline_loop(base_model, source.paths(), batch_size, os.path.join(tmp, f"base{r}.npy"))
            base_s.append(time.perf_counter() - t0)

            url = os.path.join(tmp, f"ours{r}.zarr")
            t0 = time.perf_counter()
            result = extract_embeddings(source, cfg, url, CPU, model=our_model)
            ours_s.append(time.perf_counter() - t0)
        ours = open_embeddings(url)["embeddings"][:]
    load_after = [round(v, 2) for v in os.getloadavg()]

    base_rate, ours_rate = n / statistics.median(base_s), n / statistics.median(ours_s)
    machine = machine_info()
    machine.update({
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_before": load_before,
        "load_avg_after": load_after,
    })
    cores = machine.get("cores") or os.cpu_count() or 1
    loaded = max(load_before[0], load_after[0]) > 0.5 * cores
    return {
        "benchmark": "embed",
        "model": model_name,
        "weights": "packaged",
        "images": n,
        "image_source": "demo emoji PNGs (evenly spaced subset)",
        "batch_size": batch_size,
        "num_workers": num_workers,
        "repeats": repeats,
        "baseline_images_per_s": round(base_rate, 2),
        "ours_images_per_s": round(ours_rate, 2),
        "ratio": round(ours_rate / base_rate, 2),
        "baseline_s": [round(s, 2) for s in base_s],
        "ours_s": [round(s, 2) for s in ours_s],
        "n_valid": result["n_valid"],
        "max_abs_diff": float(np.abs(ours - base).max()),
        "machine_loaded_by_others": loaded,
        "note": ("load average above half the cores during the run: other tenants shared the CPU, "
                 "absolute rates are low, the ratio is what counts") if loaded else "",
        "machine": machine,
    }


# ----------------------------------------------------------------------------- GPU mode
GPU_MODEL = "vit_base_patch16_224"
#: model FLOP utilisation of the in-memory extraction (ViT-B/16, bf16) that the GPU target asks for
TARGET_MFU = 0.5


def synthetic_rate(cfg: EmbedConfig, device: torch.device, iters: int, warmup: int) -> dict:
    """(a): the extraction's forward on one random in-memory batch already on the device.

    Returns images/s, FLOPs per image (FlopCounterMode, eager, one batch) and the timed seconds."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = _inference_model(cfg, device, None)
    h, w = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(cfg.batch_size, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        pooled_features(model, x.contiguous(memory_format=torch.channels_last))
    flops_per_image = counter.get_total_flops() / cfg.batch_size
    run = _Extractor(model, cfg, device, None, None, None, {})  # compile, channels_last, autocast as in extraction
    for _ in range(warmup):  # includes the compilation with --compile
        run.features(x)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        run.features(x)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": iters * cfg.batch_size / seconds, "flops_per_image": flops_per_image, "seconds": seconds}


def _write_jpeg_range(folder: Path, start: int, stop: int, size: int, seed: int) -> None:
    """JPEGs number start..stop-1 of `write_jpegs`; image i is drawn from `default_rng([seed, i])`."""
    import PIL.Image

    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(PIL.Image.fromarray(low).resize((size, size), PIL.Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        out = folder / f"{i % 100:02d}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(img).save(out, "JPEG", quality=90)


def write_jpegs(folder: Path, n: int, size: int = 224, seed: int = 0, workers: int = 1) -> Path:
    """`n` size×size JPEGs (smooth random colour fields + noise, quality 90) in `folder`, in 100 class
    folders (image i in `<i % 100>/`), made once by `workers` forked processes (they touch no CUDA, so, like
    DataLoader workers, they may be forked after it was initialised). The images do not depend on `workers`.
    A `.complete` file marks a finished folder, so later runs reuse it."""
    if (folder / ".complete").is_file() and len(list(folder.glob("*/*.jpg"))) == n:
        return folder
    bounds = np.linspace(0, n, max(1, min(workers, n)) * 4 + 1).astype(int)  # a few ranges per worker
    ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_write_jpeg_range, *zip(*[(folder, a, b, size, seed) for a, b in ranges])))
    else:
        for a, b in ranges:
            _write_jpeg_range(folder, a, b, size, seed)
    (folder / ".complete").write_text(f"{n}\n")
    return folder


def end_to_end_rate(cfg: EmbedConfig, device: torch.device, folder: Path) -> dict:
    """(b): `extract_embeddings` over the JPEG folder into a temporary store.

    Steady-state images/s counts the rows of every chunk after the first over the time between the
    first and the last chunk written; the wall time from the call to its return is kept as well."""
    source = folder_source(str(folder))
    stamps: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-gpu-") as tmp:
        t0 = time.perf_counter()
        result = extract_embeddings(source, cfg, os.path.join(tmp, "e.zarr"), device,
                                    progress=lambda done, total: stamps.append((time.perf_counter(), done)))
        wall = time.perf_counter() - t0
    if len(stamps) < 3:
        raise SystemExit(f"end to end: {len(stamps)} chunks written; use more --images per --batch-size so that at "
                         "least 3 chunks (4 batches each) give a steady-state rate")
    (t_first, rows_first), (t_last, rows_last) = stamps[0], stamps[-1]
    return {
        "images": len(source),
        "n_valid": result["n_valid"],
        "steady_images_per_s": (rows_last - rows_first) / (t_last - t_first),
        "wall_images_per_s": len(source) / wall,
        "wall_s": wall,
        "chunks": len(stamps),
    }


def run_gpu(args: argparse.Namespace) -> dict:
    """The GPU benchmark: (a) synthetic, (b) end to end, their ratio; see the module doc."""
    device = torch.device(args.device)
    model_name = args.model or GPU_MODEL
    cfg = EmbedConfig(model=model_name, weights=None, batch_size=args.batch_size, chunk_rows=4 * args.batch_size,
                      num_workers=args.workers, store_dtype="float16", compile=args.compile, decode=args.decode)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_flops or (peak_bf16_flops(name) if device.type == "cuda" else None)
    syn = synthetic_rate(cfg, device, args.iters, args.warmup)
    folder = write_jpegs(Path(args.jpeg_dir or Path(tempfile.gettempdir()) / f"alignet-bench-jpeg224-{args.images}"),
                         args.images, workers=args.workers or 1)
    e2e = end_to_end_rate(cfg, device, folder)
    ratio = e2e["steady_images_per_s"] / syn["images_per_s"]
    machine = machine_info()
    machine.update({"torch": torch.__version__, "timm": timm.__version__, "device_name": name,
                    "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads()})
    return {
        "benchmark": "embed_gpu",
        "device": str(device),
        "model": model_name,
        "weights": None,
        "input": "224 px" if model_name == GPU_MODEL else "the model's input size",
        "precision": "bf16 autocast" if device.type == "cuda" else "float32 (CPU dry run)",
        "channels_last": True,
        "compile": args.compile,
        "decode": args.decode,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "synthetic_images_per_s": round(syn["images_per_s"], 1),
        "flops_per_image": syn["flops_per_image"],
        "peak_bf16_flops": peak,
        "mfu": round(syn["images_per_s"] * syn["flops_per_image"] / peak, 4) if peak else None,
        "target_mfu": TARGET_MFU,
        "meets_mfu_target": (syn["images_per_s"] * syn["flops_per_image"] / peak >= TARGET_MFU) if peak else None,
        "end_to_end_images_per_s": round(e2e["steady_images_per_s"], 1),
        "end_to_end_wall_images_per_s": round(e2e["wall_images_per_s"], 1),
        "end_to_end_wall_s": round(e2e["wall_s"], 2),
        "ratio": round(ratio, 3),
        "target_ratio": 0.8,
        "meets_target": ratio >= 0.8,
        "images": e2e["images"],
        "n_valid": e2e["n_valid"],
        "image_folder": str(folder),
        "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 demo images, 1 repeat (the default sizes)")
    parser.add_argument("--gpu", action="store_true", help="GPU throughput: synthetic vs end to end (see the doc)")
    parser.add_argument("--model", default=None,
                        help=f"default: tf_efficientnet_lite0 (packaged weights); with --gpu {GPU_MODEL} (random init)")
    parser.add_argument("--images", type=int, default=None, help="default 256; with --gpu 5000 JPEGs")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32; with --gpu 256")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of our engine; default 1, with --gpu one per CPU core (max 16)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="--gpu: torch.compile the forward (embed.compile)")
    parser.add_argument("--decode", choices=["pil", "torchvision"], default="pil", help="--gpu: embed.decode")
    parser.add_argument("--device", default="cuda", help="--gpu: 'cuda' / 'cuda:<i>', or 'cpu' for a dry run of "
                        "the same code (printed, never written as a result)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="--gpu: peak dense bf16 FLOP/s of the GPU (default: from its name, e.g. H100 SXM 989e12)")
    parser.add_argument("--iters", type=int, default=30, help="--gpu: timed synthetic batches")
    parser.add_argument("--warmup", type=int, default=5, help="--gpu: untimed synthetic batches first")
    parser.add_argument("--jpeg-dir", default=None, help="--gpu: where the JPEGs are written once (default: a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.gpu:
        check_gpu_device(parser, args.device, "--gpu --device cpu --model test_vit --images 128 --batch-size 8")
        args.images = args.images or 5000
        args.batch_size = args.batch_size or 256
        args.workers = args.workers if args.workers is not None else min(16, len(os.sched_getaffinity(0)))
        suffix = ("_compile" if args.compile else "") + ("_torchvision" if args.decode == "torchvision" else "")
        report_gpu_result(f"embed_gpu{suffix}", run_gpu(args), args.device)
        return
    result = run(args.model or "tf_efficientnet_lite0", args.images or 256, args.batch_size or 32,
                 1 if args.workers is None else args.workers, args.repeats)
    write_result("embed_quick" if args.quick else "embed", result)


if __name__ == "__main__":
    main()
