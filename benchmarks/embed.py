"""Our extraction engine vs a plain thingsvision-style loop, same model, same images, same batch size.

    python -m benchmarks.embed --quick     # packaged tf_efficientnet_lite0, 256 demo emoji, batch 32

Baseline (what users write with thingsvision's extractor): the main thread decodes each image with PIL
(through `load_image`, so both sides see the same RGB pixels: the emoji are RGBA and a bare
`.convert("RGB")` would give other features) and applies the timm eval transform one by one, the model runs in float32 NCHW under
`torch.no_grad()`, each batch goes back through `.cpu().numpy()` into a list that is concatenated and
`np.save`d at the end.

Ours: `alignet_core.embed.extract_embeddings` into a temporary Zarr store (decode + transform in
DataLoader workers, channels_last, `torch.inference_mode`, chunked writes with resume markers and
provenance). Both get one warm-up forward of one batch first; times are wall-clock from the first
image opened to the last row on disk. `ratio` = ours / baseline images/s. The two feature arrays are
compared (`max_abs_diff`) so a speed-up can never come from computing something else.

Runs alternate (baseline, ours, baseline, ours, ...) and each rate is the median over `--repeats`,
so a change in the machine's load during the run hits both sides alike; the load average before
and after is recorded. Writes `benchmarks/results/embed_quick.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# torch's OpenMP threads spin while waiting by default; with DataLoader workers on the same cores
# (and other tenants) the spinning threads steal the decoders' time. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import timm
import torch

from alignet_core.config import EmbedConfig
from alignet_core.embed import extract_embeddings
from alignet_core.models import build_transform, create_model, pooled_features
from alignet_core.sources import ImageSource, demo_source, load_image, subset
from alignet_core.store import open_embeddings
from benchmarks._machine import machine_info, write_result

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 demo images, 1 repeat (the default sizes)")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="a model with packaged weights")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of our engine")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = run(args.model, args.images, args.batch_size, args.workers, args.repeats)
    write_result("embed_quick" if args.quick else "embed", result)


if __name__ == "__main__":
    main()
