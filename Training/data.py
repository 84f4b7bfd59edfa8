"""Training data: nnU-Net datasets -> preprocessed cases (cached on disk) -> crops around one class.

* A *case* (an image and its multi-label map) is prepared once with the engine's own code
  (:func:`SAMMed3DMoELib.geometry.prepare_volume`: canonical axes, the model's spacing, CT
  clamped by modality; the label is put on the prepared grid in physical space) and stored by
  MONAI's :class:`~monai.data.PersistentDataset` (loaded back with ``weights_only=True``);
  changing a file or a preprocessing setting changes the cache key.
* A training *item* is one class of one case: its binary target is ``label == class id``.
* A *sample* of an item is a window around the target cut and normalised by the engine's
  :func:`SAMMed3DMoELib.windows.extract_window` (z-score over voxels > 0), centred as the
  session centres its first window on a first click (a uniform voxel of the target), moved by a
  small random jitter, then flipped along the three axes and mildly rescaled/shifted in intensity
  with MONAI transforms. With ``--other-target-prob`` the target is sometimes another of the run's
  classes that the window shows, so that the click, not the window's centre, names the target.

Every random choice of a sample comes from a seed derived from (run seed, item, epoch or crop
variant), never from a worker's or a rank's random state: the data are the same whatever the
number of DataLoader workers or ranks, and a resumed run sees exactly what the uninterrupted
one saw. ``fixed_crops=K`` gives each item K fixed crops (epoch e uses crop e mod K), so that a
frozen encoder's embeddings can be computed once per crop (see ``Training/embedding_cache.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.transforms import Transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from SAMMed3DMoELib import geometry, windows
from SAMMed3DMoELib.errors import SAMMed3DError
from SAMMed3DMoELib.evaluation import CaseFiles, DatasetInfo, load_case, read_dataset
from SAMMed3DMoELib.geometry import PreparedVolume, Volume

CACHE_VERSION = 2  # 2: the prepared arrays are stored (1 stored only the file names: nothing was cached)


@dataclass(frozen=True)
class Preprocessing:
    """What the engine does to a volume before the model sees it (a bundle's ``preprocessing``)."""

    spacing_mm: float = geometry.DEFAULT_SPACING
    window: int = geometry.WINDOW_SIZE
    ct_clamp: Optional[Tuple[float, float]] = geometry.CT_CLAMP

    def as_bundle(self) -> dict:
        return {"spacing_mm": float(self.spacing_mm), "window": int(self.window),
                "ct_clamp": None if self.ct_clamp is None else [float(v) for v in self.ct_clamp],
                "normalization": "zscore_nonzero"}

    @classmethod
    def from_bundle(cls, pre: dict) -> "Preprocessing":
        if pre.get("normalization", "zscore_nonzero") != "zscore_nonzero":
            raise SAMMed3DError(f"training knows the zscore_nonzero normalisation only, not {pre['normalization']!r}")
        spacing = pre.get("spacing_mm", geometry.DEFAULT_SPACING)
        if isinstance(spacing, (list, tuple)):
            if len(set(float(s) for s in spacing)) != 1:
                raise SAMMed3DError("training uses isotropic spacing; this bundle's spacing_mm is anisotropic")
            spacing = spacing[0]
        clamp = pre.get("ct_clamp", list(geometry.CT_CLAMP))
        return cls(float(spacing), int(pre.get("window", geometry.WINDOW_SIZE)), None if clamp is None else tuple(clamp))


# ----------------------------------------------------------------------------------- cases


def _stamp(path: Path) -> str:
    """Size and modification time of a file (or of every file of a folder): the cache key part
    that changes when the data change."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class PrepareCase(Transform):
    """MONAI deterministic transform (a ``Transform`` and not randomizable, so that
    ``PersistentDataset`` stores its result; it stores no plain callable's): a case's file names -> the prepared image, its label
    map on the prepared grid, and the grid's geometry, as tensors (cacheable with weights_only)."""

    def __call__(self, item: dict) -> dict:
        case = CaseFiles(item["case_id"], Path(item["image"]), Path(item["label"]))
        image, label = load_case(case)
        prepared = geometry.prepare_volume(image, spacing=item["spacing_mm"], modality=item["modality"],
                                           ct_clamp=item["ct_clamp"])
        on_grid = geometry.resample_label(label, image, prepared)
        if on_grid.min() < 0 or on_grid.max() > 32767:
            raise SAMMed3DError(f"{case.label}: label ids must lie in 0..32767")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(prepared.array, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(on_grid, dtype=np.int16)),
            "affine": torch.from_numpy(prepared.affine.astype(np.float64)),
            "source_shape": torch.tensor(image.shape, dtype=torch.int64),
            "source_affine": torch.from_numpy(image.affine.astype(np.float64)),
            "is_ct": bool(prepared.is_ct),
        }


@dataclass(frozen=True)
class CaseRef:
    dataset: str
    case_id: str
    modality: str
    labels: Tuple[Tuple[int, str], ...]


class PreparedCases:
    """The prepared cases of some datasets, computed once and cached on disk (MONAI
    ``PersistentDataset``) and the most recent few kept in memory."""

    def __init__(self, datasets: Sequence[DatasetInfo], pre: Preprocessing, cache_dir, memory_cases: int = 16):
        from monai.data import PersistentDataset

        self.refs: List[CaseRef] = []
        items = []
        for ds in datasets:
            for case in ds.cases:
                self.refs.append(CaseRef(ds.name, case.case_id, ds.modality, tuple(sorted(ds.labels.items()))))
                items.append({
                    "case_id": case.case_id, "image": str(case.image), "label": str(case.label),
                    "modality": ds.modality, "spacing_mm": float(pre.spacing_mm),
                    "ct_clamp": None if pre.ct_clamp is None else [float(v) for v in pre.ct_clamp],
                    "stamp": _stamp(case.image) + _stamp(case.label), "version": CACHE_VERSION,
                })
        cache_dir = Path(cache_dir).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._store = PersistentDataset(items, transform=PrepareCase(), cache_dir=cache_dir, weights_only=True)
        self._memory: "OrderedDict[int, dict]" = OrderedDict()
        self._memory_cases = max(1, int(memory_cases))

    def __len__(self) -> int:
        return len(self.refs)

    def get(self, index: int) -> dict:
        case = self._memory.get(index)
        if case is None:
            case = self._store[index]
            self._memory[index] = case
            while len(self._memory) > self._memory_cases:
                self._memory.popitem(last=False)
        else:
            self._memory.move_to_end(index)
        return case

    def prepared_volume(self, index: int) -> PreparedVolume:
        """The cached case as the engine's PreparedVolume (its source is a zero-size stand-in
        with the original grid's shape and affine: windows are cut from the prepared array)."""
        case = self.get(index)
        shape = tuple(int(s) for s in case["source_shape"])
        source = Volume(np.broadcast_to(np.zeros((), np.float32), shape), case["source_affine"].numpy())
        return PreparedVolume(array=case["image"].numpy(), affine=case["affine"].numpy(), source=source,
                              is_ct=bool(case["is_ct"]))


# ----------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One class of one case: the binary target ``label == label_id``."""

    case: int
    label_id: int
    name: str
    dataset: str
    modality: str
    voxels: int
    expert: int = 0


def open_datasets(folders: Sequence) -> List[DatasetInfo]:
    if not folders:
        raise SAMMed3DError("no training data given: pass --data with one or more dataset folders (nnU-Net layout)")
    return [read_dataset(f) for f in folders]


def build_items(cases: PreparedCases, classes: Sequence[str] = (), exclude: Sequence[str] = (),
                modality: Optional[str] = None, min_voxels: int = 10) -> List[Item]:
    """Every (case, class) whose target has at least ``min_voxels`` voxels on the prepared grid,
    keeping only ``classes`` (names; all if empty), dropping ``exclude``, and only cases of
    ``modality`` ("CT"/"MR") when given."""
    wanted, dropped = set(classes), set(exclude)
    items = []
    for index, ref in enumerate(cases.refs):
        if modality and ref.modality != modality.upper():
            continue
        counts = np.bincount(cases.get(index)["label"].numpy().astype(np.int64).ravel().clip(min=0))
        for label_id, name in ref.labels:
            if (wanted and name not in wanted) or name in dropped:
                continue
            n = int(counts[label_id]) if label_id < len(counts) else 0
            if n >= max(1, int(min_voxels)):
                items.append(Item(index, label_id, name, ref.dataset, ref.modality, n))
    if not items:
        raise SAMMed3DError(
            "no (case, class) pair to train on: none of the requested classes has enough voxels "
            f"(classes={sorted(wanted) or 'all'}, min_voxels={min_voxels}); check the class names against dataset.json"
        )
    return items


# ----------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Augmentation:
    """Random changes of a sample: window jitter (voxels), flips per axis, intensity scale/shift,
    and how often the target is another class the window shows (``other_target_prob``)."""

    jitter: int = 8
    flip_prob: float = 0.5
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    box_jitter: float = 2.0
    other_target_prob: float = 0.0

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(jitter=0, flip_prob=0.0, intensity_prob=0.0, box_jitter=0.0)


def sample_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of non-negative integers (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def crop_label(label: np.ndarray, window: windows.Window) -> np.ndarray:
    """The window's part of a prepared-grid label, zero where it hangs over the volume."""
    s = window.size
    out = np.zeros((s, s, s), dtype=label.dtype)
    lo = [max(0, a) for a in window.start]
    hi = [min(n, a + s) for a, n in zip(window.start, label.shape)]
    if all(h > lo_ for lo_, h in zip(lo, hi)):
        out[tuple(slice(l_ - a, h - a) for l_, h, a in zip(lo, hi, window.start))] = \
            label[tuple(slice(l_, h) for l_, h in zip(lo, hi))]
    return out


OTHER_TARGET_MIN_VOXELS = 64


def window_around(index: Sequence[int], size: int) -> windows.Window:
    """The window a session opens for a first click on prepared voxel ``index`` (it lands on
    window index size // 2), computed on the prepared grid itself. Going through RAS and
    ``window_for_point`` would refuse target voxels whose centre lies just past the source
    image's extent: the prepared grid covers whole voxels of the new spacing (a 40 mm slab at
    3 mm has 14 slices, 42 mm), and the label reaches its last slice."""
    return windows.Window(tuple(int(i) - int(size) // 2 for i in index), int(size))


class CropDataset(Dataset):
    """Samples of :class:`Item` s. Index with ``(item, epoch)`` (what :class:`EpochSampler`
    yields) or a plain item index (epoch 0). A sample is a dict:

    * ``image`` (1, S, S, S) float32, normalised; ``target`` (1, S, S, S) float32 in {0, 1};
    * ``click_u`` (iterations,) float64 uniform numbers for the clicks; ``box_jitter`` (2, 3);
    * ``expert`` (gate label), ``item`` and ``variant`` (crop key for the embedding cache).
    """

    def __init__(self, cases: PreparedCases, items: Sequence[Item], pre: Preprocessing, *, seed: int = 0,
                 augment: Augmentation = Augmentation(), fixed_crops: int = 0, iterations: int = 11,
                 stream: int = 0):
        self.cases = cases
        self.items = list(items)
        self.pre = pre
        self.seed = int(seed)
        self.augment = augment
        self.fixed_crops = int(fixed_crops)
        self.iterations = int(iterations)
        self.stream = int(stream)  # keeps training and validation samples apart
        self._case_classes: Dict[int, Dict[int, Item]] = {}
        for item in self.items:
            self._case_classes.setdefault(item.case, {})[item.label_id] = item
        self._transform = self._build_transform()

    def _build_transform(self):
        from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

        a = self.augment
        keys = ["image", "target"]
        return Compose([
            RandFlipd(keys, prob=a.flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=a.flip_prob, spatial_axis=1),
            RandFlipd(keys, prob=a.flip_prob, spatial_axis=2),
            RandScaleIntensityd("image", factors=a.intensity_scale, prob=a.intensity_prob),
            RandShiftIntensityd("image", offsets=a.intensity_shift, prob=a.intensity_prob),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def variant(self, epoch: int) -> int:
        return epoch % self.fixed_crops if self.fixed_crops else epoch

    def __getitem__(self, key) -> dict:
        index, epoch = (key if isinstance(key, tuple) else (key, 0))
        item = self.items[index]
        variant = self.variant(int(epoch))
        crop_rng = np.random.default_rng(sample_seed(self.seed, self.stream, index, variant, 1))
        click_rng = np.random.default_rng(sample_seed(self.seed, self.stream, index, int(epoch), 2))
        prepared = self.cases.prepared_volume(item.case)
        label = self.cases.get(item.case)["label"].numpy()
        inside = np.flatnonzero(label == item.label_id)
        centre = np.unravel_index(inside[crop_rng.integers(len(inside))], label.shape)
        window = window_around(centre, self.pre.window)
        j = self.augment.jitter
        if j > 0:
            window = windows.Window(tuple(np.asarray(window.start) + crop_rng.integers(-j, j + 1, size=3)), window.size)
        image = windows.extract_window(prepared, window)
        crop = crop_label(label, window)
        target_item = self._target_in_window(item, crop, sample_seed(self.seed, self.stream, index, int(epoch), 3))
        target = (crop == target_item.label_id).astype(np.float32)
        self._transform.set_random_state(seed=int(crop_rng.integers(2 ** 31)))
        out = self._transform({"image": torch.from_numpy(image)[None], "target": torch.from_numpy(target)[None]})
        image_t, target_t = (torch.as_tensor(out[k]).float().contiguous() for k in ("image", "target"))
        box_jitter = click_rng.uniform(-1, 1, size=(2, 3)) * self.augment.box_jitter
        return {
            "image": image_t,
            "target": target_t,
            "click_u": torch.from_numpy(click_rng.random(self.iterations)),
            "box_jitter": torch.from_numpy(box_jitter).float(),
            "expert": torch.tensor(target_item.expert, dtype=torch.long),
            "item": torch.tensor(index, dtype=torch.long),
            "variant": torch.tensor(variant, dtype=torch.long),
        }


    def _target_in_window(self, item: Item, crop: np.ndarray, seed: int) -> Item:
        """The item the window is centred on or, with probability ``other_target_prob``, a class
        drawn uniformly from the run's classes of this case that the window shows with at least
        ``OTHER_TARGET_MIN_VOXELS`` voxels (the centred one among them). Then the window's centre
        no longer names the target; only the click does, as when a user clicks a structure
        off-centre in a window that is already open."""
        p = self.augment.other_target_prob
        if p <= 0:
            return item
        rng = np.random.default_rng(seed)
        if rng.random() >= p:
            return item
        classes = self._case_classes[item.case]
        counts = np.bincount(crop.ravel().astype(np.int64).clip(min=0), minlength=max(classes) + 1)
        shown = [classes[i] for i in sorted(classes) if counts[i] >= OTHER_TARGET_MIN_VOXELS]
        return shown[rng.integers(len(shown))] if shown else item


class EpochSampler(Sampler):
    """``DistributedSampler``'s order (shuffled per epoch with the run seed, one share per rank),
    yielding ``(index, epoch)`` and able to start part-way into an epoch (exact resume)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def _indices(self) -> List[int]:
        inner = DistributedSampler(range(self.size), num_replicas=self.world_size, rank=self.rank,
                                   shuffle=self.shuffle, seed=self.seed, drop_last=True)
        inner.set_epoch(self.epoch)
        return list(inner)

    def per_epoch(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self._indices()[self.skip:]:
            yield index, self.epoch

    def __len__(self) -> int:
        return max(0, self.per_epoch() - self.skip)


def make_loader(dataset: CropDataset, sampler: Sampler, batch_size: int, num_workers: int, device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=torch.device(device).type == "cuda",
                      multiprocessing_context="fork" if num_workers and os.name == "posix" else None)


def describe_items(items: Sequence[Item]) -> Dict[str, int]:
    """Number of items per class name (for the run's log)."""
    out: Dict[str, int] = {}
    for item in items:
        key = f"{item.name} ({item.modality})"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------- options


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sammed3d-moe" / "preprocessed"


def add_data_arguments(parser, *, flips: bool = True) -> None:
    """``--data``/``--val-data`` dataset folders, class filters, cache, augmentation options."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[], metavar="DATASET",
                   help="training dataset folders (nnU-Net layout: imagesTr/, labelsTr/, dataset.json)")
    g.add_argument("--classes", default="", help="comma-separated class names to train on (default: all)")
    g.add_argument("--exclude-classes", default="", help="comma-separated class names to leave out")
    g.add_argument("--modality", choices=("CT", "MR"), default=None, help="use only cases of this modality")
    g.add_argument("--val-data", nargs="+", default=[], metavar="DATASET",
                   help="validation dataset folders (best checkpoint / tau); default: none")
    g.add_argument("--val-classes", default=None, help="validation classes (default: the training --classes)")
    g.add_argument("--min-voxels", type=int, default=10, help="skip targets smaller than this on the prepared grid")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where prepared cases are cached (default: ~/.cache/sammed3d-moe/preprocessed)")
    a = parser.add_argument_group("augmentation")
    a.add_argument("--crop-jitter", type=int, default=8, help="random shift of the window in voxels (each axis)")
    a.add_argument("--flip-prob", type=float, default=0.5 if flips else 0.0,
                   help="probability of a flip along each of the three axes")
    a.add_argument("--intensity-prob", type=float, default=0.5,
                   help="probability of a random intensity scale (±10 %%) and of a shift (±0.1 SD)")
    a.add_argument("--box-jitter", type=float, default=2.0, help="random shift of box corners in voxels")
    a.add_argument("--other-target-prob", type=float, default=0.0,
                   help="probability that a sample's target is another of the run's classes that the window shows, "
                        "not the one it is centred on (SAM's several targets per image): only the click names it")


def augmentation_from_args(args) -> Augmentation:
    if not 0.0 <= args.other_target_prob <= 1.0:
        raise SAMMed3DError(f"--other-target-prob must lie in [0, 1], not {args.other_target_prob}")
    return Augmentation(jitter=args.crop_jitter, flip_prob=args.flip_prob, intensity_prob=args.intensity_prob,
                        box_jitter=args.box_jitter, other_target_prob=args.other_target_prob)


def load_split(folders: Sequence, pre: Preprocessing, cache_dir, ctx, *, classes: Sequence[str] = (),
               exclude: Sequence[str] = (), modality: Optional[str] = None, min_voxels: int = 10
               ) -> Tuple[PreparedCases, List[Item]]:
    """Prepared cases (rank 0 fills the disk cache first, the other ranks then read it) and items."""
    from .distributed import barrier

    datasets = open_datasets(folders)
    result = None
    for turn in (0, 1):
        if (turn == 0) == ctx.is_main:
            cases = PreparedCases(datasets, pre, cache_dir)
            result = (cases, build_items(cases, classes, exclude, modality, min_voxels))
        barrier(ctx)
    return result
