"""Interactive-session latency and memory with the full-size network (random weights: speed does
not depend on the values), on the real example CT and on a synthetic 512x512x300 CT.

Measures, in one process:
* first click: prepare the volume + encode the window + decode + map back;
* a later click in the same (cached) window: prompt encoder + gate + decoder + map back;
* a 5-click session against re-running everything per click (what the official inference
  script does: prepare, encode, decode for every click), as a ratio;
* peak resident memory above the process's level before each scenario.

Windows are limited to one (``max_windows=1``): random weights give masks that wander across
window faces, which would measure the extension rather than a click.

    python Testing/benchmarks/bench_session.py --threads 2
    python Testing/benchmarks/bench_session.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from SAMMed3DMoELib import geometry, volume_io
from SAMMed3DMoELib.device import describe_device, select_device, set_cpu_threads
from SAMMed3DMoELib.model import build_sam_med3d
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session

DATA = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "totalsegmentator-example"


class PeakRSS:
    """Samples this process's resident memory every few ms while active (Linux /proc)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def synthetic_ct(shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0)) -> geometry.Volume:
    """A body-like phantom: air, a soft-tissue ellipsoid with noise, a denser 'organ' inside."""
    rng = np.random.default_rng(0)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [n / 2 for n in shape]
    body = ((i - c[0]) / (0.42 * shape[0])) ** 2 + ((j - c[1]) / (0.33 * shape[1])) ** 2 <= 1.0
    organ = ((i - c[0] * 0.8) / 60) ** 2 + ((j - c[1]) / 50) ** 2 + ((k - c[2]) / 70) ** 2 <= 1.0
    array = np.full(shape, -1000, dtype=np.int16)
    array[np.broadcast_to(body, shape)] = 40
    array[organ] = 120
    array += rng.normal(0, 15, size=shape).astype(np.int16)
    affine = np.diag(list(spacing) + [1.0])
    return geometry.Volume(array, affine), np.array([c[0] * 0.8, c[1], c[2]])


def clicks_around(volume: geometry.Volume, centre_ijk, n: int):
    """n RAS clicks within a few voxels of a centre (all in one window)."""
    offsets = [(0, 0, 0), (4, 0, 0), (0, 4, 0), (0, 0, 4), (-4, -4, 0)]
    return [volume.ijk_to_ras(np.array([centre_ijk + np.array(o)], dtype=float))[0] for o in offsets[:n]]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_volume(name, volume, centre_ijk, model, device, repeats):
    clicks = clicks_around(volume, centre_ijk, 5)
    rows = {}
    with PeakRSS() as mem:
        sync(device)
        start = time.perf_counter()
        session = Session(volume, model, device=device, max_windows=1)
        session.add_point(clicks[0])
        first = session.predict()
        sync(device)
        rows["first click (ms)"] = (time.perf_counter() - start) * 1e3
        later = []
        for click in clicks[1:]:
            session.add_point(click, positive=False)
            sync(device)
            start = time.perf_counter()
            session.predict()
            sync(device)
            later.append((time.perf_counter() - start) * 1e3)
        five_cached = rows["first click (ms)"] + sum(later)
        cached_mb = session.cached_bytes / 2 ** 20
    rows["later click, cached window (ms, median)"] = statistics.median(later)
    rows["session cache after 5 clicks (MB, budget 512)"] = cached_mb
    rows["peak RSS above start, cached session (MB)"] = mem.delta_mb
    rows["stages of first click (ms)"] = first.timings_ms

    with PeakRSS() as mem:
        start = time.perf_counter()
        for n in range(1, 6):  # re-run everything per click, as the official inference does
            fresh = Session(volume, model, device=device, max_windows=1, protocol="accumulate")
            for k, click in enumerate(clicks[:n]):
                fresh.add_point(click, positive=(k == 0))
            fresh.predict()
            sync(device)
        five_reencode = (time.perf_counter() - start) * 1e3
    rows["5-click session, cached (ms)"] = five_cached
    rows["5-click session, re-encode every click (ms)"] = five_reencode
    rows["speed-up of the cached session"] = five_reencode / five_cached
    rows["peak RSS above start, re-encode (MB)"] = mem.delta_mb
    return name, volume.shape, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    device = select_device(args.device)
    if device.type == "cpu":
        set_cpu_threads(args.threads)
    torch.manual_seed(0)
    model = SamMed3DMoE(build_sam_med3d()).to(device)  # on the sessions' device: they share it
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores visible, {describe_device(device)}, "
          f"torch {torch.__version__}" + (f", {args.threads} CPU threads" if device.type == "cpu" else ""))
    volumes = []
    ct = volume_io.load_volume(DATA / "example_ct.nii.gz")
    volumes.append(("example CT (TotalSegmentator)", ct, np.array([60, 50, 56])))
    if not args.skip_synthetic:
        synth, centre = synthetic_ct()
        volumes.append(("synthetic CT 512x512x300", synth, centre.astype(int)))
    for name, volume, centre in volumes:
        name, shape, rows = bench_volume(name, volume, centre, model, device, args.repeats)
        print(f"\n### {name}, {shape[0]}x{shape[1]}x{shape[2]} voxels\n")
        print("| measure | value |\n|---|---|")
        for key, value in rows.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.0f}" for k, v in value.items())
            elif "speed-up" in key:
                value = f"{value:.2f}x"
            elif key.startswith("session cache"):
                value = f"{value:.1f}"
            else:
                value = f"{value:.0f}"
            print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
