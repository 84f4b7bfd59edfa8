"""Image-encoder speed: the fast padded-window attention against the official literal form,
on one 128³ window, in the same process. Prints a Markdown table for BENCHMARKS.md.

    python Testing/benchmarks/bench_encoder.py --threads 2            # CPU, float32
    python Testing/benchmarks/bench_encoder.py --device cuda --dtypes float32 bfloat16 float16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from SAMMed3DMoELib.device import describe_device, select_device, set_cpu_threads
from SAMMed3DMoELib.model import build_sam_med3d


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = select_device(args.device)
    if device.type == "cpu":
        set_cpu_threads(args.threads)
    torch.manual_seed(0)
    model = build_sam_med3d().to(device)
    image = torch.randn(1, 1, 128, 128, 128, device=device)
    print(f"machine: {platform.processor() or platform.machine()}, {describe_device(device)}, "
          f"torch {torch.__version__}" + (f", {args.threads} CPU threads" if device.type == "cpu" else ""))
    print("| dtype | literal (ms) | fast (ms) | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        encoder = model.image_encoder.to(dtype)
        x = image.to(dtype)
        results = {}
        with torch.inference_mode():
            for mode in ("literal", "fast"):
                encoder.set_attention_mode(mode)
                results[mode] = encoder(x).float()
                results[mode + "_t"] = statistics.median(_time(lambda: encoder(x), device, args.repeats))
        encoder.set_attention_mode("fast")
        diff = (results["literal"] - results["fast"]).abs().max().item()
        print(f"| {name} | {results['literal_t'] * 1e3:.0f} | {results['fast_t'] * 1e3:.1f} | "
              f"{results['literal_t'] / results['fast_t']:.2f}x | {diff:.2e} |")


if __name__ == "__main__":
    main()
