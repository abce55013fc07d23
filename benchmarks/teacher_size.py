"""The demo teacher's cost at the input sizes `embed.image_size` offers (issue 31: the demo's time).

    python -m benchmarks.teacher_size [--images 384] [--sizes 260 192 160 128] [--repeats 3]

The demo's images are 64-px emoji; the packaged EfficientNet-Lite2 upsamples them to its pretrained 260 px.
For each size this runs the real extraction (`embed.extract.extract_embeddings`: decode, the model's eval
transform at that size, channels_last, folded BatchNorms, a Zarr store on disk) over the first `--images`
demo emoji, the sizes in turn within each round and the order reversed every other round, so a change in
the machine's load hits every size alike; each time is the median over `--repeats` rounds. It reports
images/s, the forward FLOPs per image (`torch.utils.flop_counter`), and each size's time and FLOPs as a
ratio to 260 px's measured in the same run. What the size does to the people figures is measured through
the pipeline (`benchmarks.demo_variants`, variant `teacher_128`). Writes results/teacher_size.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._machine import machine_info, write_result


def flops_per_image(model: object, size: int) -> float:
    """Forward FLOPs of one image at `size` px (torch's counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)  # type: ignore[operator]
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[260, 192, 160, 128])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from alignet_core.config.embed import EmbedConfig
    from alignet_core.embed.extract import extract_embeddings
    from alignet_core.io.sources import ImageSource, demo_source
    from alignet_core.models.factory import create_model

    before = machine_info()
    demo = demo_source()
    src = ImageSource(demo.records[: args.images], description=f"first {args.images} demo emoji")
    base = EmbedConfig()  # the demo's teacher: packaged tf_efficientnet_lite2, batch 64
    model = create_model(base.model, base.weights)
    times: dict[int, list[float]] = {s: [] for s in args.sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for s in args.sizes if r % 2 == 0 else list(reversed(args.sizes)):
                url = str(Path(tmp) / f"r{r}_s{s}.zarr")
                t0 = time.perf_counter()
                extract_embeddings(src, base.model_copy(update={"image_size": s}), url, torch.device("cpu"),
                                   model=model)
                times[s].append(time.perf_counter() - t0)
    ref = args.sizes[0]
    med = {s: statistics.median(v) for s, v in times.items()}
    flops = {s: flops_per_image(model.eval(), s) for s in args.sizes}
    sizes = {str(s): {"seconds_median": round(med[s], 2), "seconds_all": [round(t, 2) for t in times[s]],
                      "images_per_s": round(len(src) / med[s], 1), "gflops_per_image": round(flops[s] / 1e9, 3),
                      "time_vs_ref": round(med[s] / med[ref], 3), "flops_vs_ref": round(flops[s] / flops[ref], 3)}
             for s in args.sizes}
    result = {"benchmark": "teacher_size", "model": base.model, "images": len(src), "reference_size": ref,
              "repeats": args.repeats, "order": "sizes in turn, reversed every other round", "sizes": sizes,
              "machine_before": before, "machine": machine_info()}
    write_result("teacher_size", result)


if __name__ == "__main__":
    main()
