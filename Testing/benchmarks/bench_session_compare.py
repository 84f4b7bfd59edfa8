"""Later-click latency of this checkout's session against another checkout's, in one process.

On a shared machine absolute times move a lot between runs; alternating the two sessions click
by click in one process gives a ratio that means something. The other checkout's
``SAMMed3DMoELib`` is imported under another name (its imports are relative), both sessions get
the same full-size model weights (random: speed does not depend on the values) and the same
clicks, one window each.

    PYTHONPATH=. python Testing/benchmarks/bench_session_compare.py --baseline ../main --clicks 40
    PYTHONPATH=. python Testing/benchmarks/bench_session_compare.py --baseline ../main --synthetic
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from SAMMed3DMoELib import volume_io
from SAMMed3DMoELib.device import set_cpu_threads
from SAMMed3DMoELib.model import build_sam_med3d
from SAMMed3DMoELib.moe import SamMed3DMoE
from SAMMed3DMoELib.session import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_session import DATA, synthetic_ct  # noqa: E402


def baseline_package(checkout: Path, folder: Path):
    """The other checkout's library, copied into ``folder`` as the package ``baseline_lib``."""
    shutil.copytree(checkout / "SAMMed3DMoELib", folder / "baseline_lib")
    sys.path.insert(0, str(folder))
    return (importlib.import_module("baseline_lib.session"), importlib.import_module("baseline_lib.moe"),
            importlib.import_module("baseline_lib.geometry"), importlib.import_module("baseline_lib.model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of this repository")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true", help="the 512x512x300 synthetic CT instead")
    args = parser.parse_args()
    set_cpu_threads(args.threads)
    if args.synthetic:
        volume, centre = synthetic_ct()
        centre = centre.astype(int)
    else:
        volume, centre = volume_io.load_volume(DATA / "example_ct.nii.gz"), np.array([60, 50, 56])
    torch.manual_seed(0)
    model = SamMed3DMoE(build_sam_med3d())
    offsets = [(0, 0, 0), (4, 0, 0), (0, 4, 0), (0, 0, 4), (-4, -4, 0), (4, 4, 0), (-4, 0, 4)]
    clicks = [volume.ijk_to_ras(np.array([centre + np.array(o)], dtype=float))[0] for o in offsets]
    with tempfile.TemporaryDirectory() as tmp:
        old_session, old_moe, old_geometry, old_model = baseline_package(args.baseline.resolve(), Path(tmp))
        old = old_moe.SamMed3DMoE(old_model.build_sam_med3d())
        old.load_state_dict(model.state_dict())
        sessions = {
            "baseline": old_session.Session(old_geometry.Volume(volume.array, volume.affine), old, device="cpu",
                                            max_windows=1),
            "this checkout": Session(volume, model, device="cpu", max_windows=1),
        }
        for session in sessions.values():
            session.add_point(clicks[0])
            session.add_point(clicks[1], positive=False)
            session.predict()
        times = {name: [] for name in sessions}
        for n in range(args.clicks):  # replace the last click: one decoder step each time
            order = list(sessions.items()) if n % 2 else list(sessions.items())[::-1]
            for name, session in order:
                session.undo()
                session.add_point(clicks[2 + n % 5], positive=False)
                start = time.perf_counter()
                session.predict()
                times[name].append((time.perf_counter() - start) * 1e3)
    print(f"{volume.shape}, {args.clicks} later clicks each, alternating, {args.threads} CPU threads\n")
    print("| session | median (ms) | fastest (ms) |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} |")
    ratio = statistics.median(times["this checkout"]) / statistics.median(times["baseline"])
    fastest = min(times["this checkout"]) / min(times["baseline"])
    print(f"\nthis checkout / baseline: {ratio:.2f} (medians), {fastest:.2f} (fastest)")


if __name__ == "__main__":
    main()
