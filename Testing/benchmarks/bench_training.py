"""Training benchmarks on the real example CT (CPU by default).

1. Gate training with the frozen encoder's embeddings cached per crop vs. encoded at every
   step (Training/embedding_cache.py): time of one optimizer step (gate forward/backward over
   the click iterations, decoders, optimizer), batches already loaded, same process; the ratio
   is the speed-up the cache gives.
2. Pre-training throughput: samples per second of a full training step (encoder, 11 prompt
   iterations, DiceCE, backward, AdamW) for each model size, and the same with the encoder
   frozen and cached (expert fine-tuning).

    python Testing/benchmarks/bench_training.py --sizes tiny,small --threads 2

Other processes share the CPU on a busy machine: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from SAMMed3DMoELib.evaluation import read_dataset  # noqa: E402
from SAMMed3DMoELib.model import GatingNetwork  # noqa: E402
from SAMMed3DMoELib.moe import ExpertInfo, SamMed3DMoE  # noqa: E402
from Training.convert_samples import convert  # noqa: E402
from Training.data import CropDataset, Preprocessing, PreparedCases, build_items  # noqa: E402
from Training.embedding_cache import EmbeddingCache  # noqa: E402
from Training.interactive import GateTraining, InteractiveSegmentation, PromptPlan  # noqa: E402
from Training.models import MODEL_SIZES, new_model  # noqa: E402

CLASSES = ["liver", "spleen", "kidney_left", "kidney_right", "aorta", "stomach"]


def _batches(folder: Path, cache: Path, img_size: int, n: int, batch: int, iterations: int):
    pre = Preprocessing(3.0, img_size)
    cases = PreparedCases([read_dataset(folder)], pre, cache)
    items = build_items(cases, CLASSES)
    for i, item in enumerate(items):
        items[i] = type(item)(**{**item.__dict__, "expert": i % 3})
    data = CropDataset(cases, items, pre, seed=0, fixed_crops=1, iterations=iterations)
    out = []
    for b in range(n):
        samples = [data[((b * batch + k) % len(items), 0)] for k in range(batch)]
        out.append({key: torch.stack([s[key] for s in samples]) for key in samples[0]})
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_pair(steps: dict, batches, repeats: int) -> dict:
    """Median seconds per step of each of two step functions, timed alternately (A, B, A, B...)
    so that a change in the machine's load hits both alike."""
    for step in steps.values():
        step(batches[0])  # warm-up
    times = {label: [] for label in steps}
    for r in range(repeats):
        for label, step in steps.items():
            _sync()
            start = time.perf_counter()
            step(batches[r % len(batches)])
            _sync()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def bench_gate(size: str, batches, repeats: int, device) -> dict:
    base = new_model(MODEL_SIZES[size], box_prompts=True, seed=0)
    experts = {name: base.new_mask_decoder() for name in ("a", "b")}
    dim = base.config["prompt_embed_dim"]
    moe = SamMed3DMoE(base, experts, GatingNetwork(dim, 2, num_heads=4), {n: ExpertInfo(n) for n in experts}).to(device)
    moe.requires_grad_(False)
    moe.gate.requires_grad_(True)
    module = GateTraining(moe)
    optimizer = torch.optim.AdamW(moe.gate.parameters(), lr=1e-4)
    steps = {}
    for label, enabled in (("encoded every step", False), ("cached embeddings", True)):
        cache = EmbeddingCache(base.image_encoder, enabled=enabled)
        for b in batches:  # the cache sees every crop once before timing
            if enabled:
                cache(b["image"], b["item"], b["variant"])

        def step(batch, cache=cache):
            optimizer.zero_grad()
            emb = cache(batch["image"], batch["item"], batch["variant"])
            module(batch["image"], batch["target"], batch["expert"], batch["click_u"], 5, emb)["loss"].backward()
            optimizer.step()

        steps[label] = step
    return _time_pair(steps, batches, repeats)


def bench_pretrain(size: str, batches, repeats: int, device) -> dict:
    model = new_model(MODEL_SIZES[size], box_prompts=True, seed=0).to(device).train()
    module = InteractiveSegmentation(model)
    plan = PromptPlan(11, frozenset({5, 10}), False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def full(batch):
        optimizer.zero_grad()
        module(batch["image"], batch["target"], batch["click_u"], batch["box_jitter"], plan)["loss"].backward()
        optimizer.step()

    cache = EmbeddingCache(model.image_encoder)
    decoder_params = list(model.mask_decoder.parameters())

    def expert(batch):
        optimizer.zero_grad()
        frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in decoder_params)]
        for p in frozen:
            p.requires_grad_(False)
        emb = cache(batch["image"], batch["item"], batch["variant"])
        module(batch["image"], batch["target"], batch["click_u"], batch["box_jitter"], plan, emb)["loss"].backward()
        optimizer.step()
        for p in frozen:
            p.requires_grad_(True)

    return _time_pair({"all parts trained": full, "decoder only, cached embeddings": expert}, batches, repeats)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,small", help="model sizes (Training.models.MODEL_SIZES)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (float32; the scripts add AMP on CUDA)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_name()}, {args.threads} torch thread(s)"
    print(f"machine: {where}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        data = convert(Path(tmp) / "data", only=["Dataset501_ExampleCT"])["Dataset501_ExampleCT"]
        print("| model | window | measurement | seconds per step | samples/s | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for size in args.sizes.split(","):
            img = new_model(MODEL_SIZES[size], True, 0).img_size
            batches = [{k: v.to(device) for k, v in b.items()}
                       for b in _batches(data, Path(tmp) / "cache", img, 3, args.batch, 11)]
            gate = bench_gate(size, batches, args.repeats, device)
            slow = gate["encoded every step"]
            for label, value in gate.items():
                ratio = f"{slow / value:.2f}x" if label != "encoded every step" else "1.00x"
                print(f"| {size} | {img}³ | gate step, {label} | {value:.3f} | {args.batch / value:.2f} | {ratio} |")
            train = bench_pretrain(size, batches, args.repeats, device)
            whole = train["all parts trained"]
            for label, value in train.items():
                print(f"| {size} | {img}³ | training step (11 iterations), {label} | {value:.3f} | "
                      f"{args.batch / value:.2f} | {whole / value:.2f}x |")


if __name__ == "__main__":
    main()
