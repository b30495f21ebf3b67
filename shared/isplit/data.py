"""Datasets and preprocessing.

Every dataset is held as ``uint8`` images ``(N, C, H, W)`` at native size with ``int64``
labels; batches are resized and normalised on the fly by the one function that the edge
client also uses (:func:`to_model_input`), so training, analysis and the edge see the same
pixels.

Dataset specs: ``fashion-mnist`` (Debian's IDX files), ``digits`` (scikit-learn's bundled
8x8 digits), ``imagefolder:<path>`` (one folder per class; ``train/`` and ``test/`` (or
``val/``) sub-folders when present, else a deterministic 80/20 split).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from isplit import IsplitError

FASHION_MNIST_DIR = Path(os.environ.get("ISPLIT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DATASETS_HELP = "fashion-mnist, digits, imagefolder:<path>"
CLASS_INDEX = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only: int("²") raises, int("５") == 5


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64 class indices into ``class_names``.
        class_names: names of all classes of the dataset (not only those present).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, classes: Sequence[int] | None = None, max_images: int | None = None) -> ImageSet:
        """The images of ``classes`` (all when None), first ``max_images`` in a stable order."""
        idx = torch.arange(len(self))
        if classes is not None:
            keep = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.int64))
            idx = idx[keep]
            if idx.numel() == 0:
                raise IsplitError(f"no images of classes {list(classes)} in this split")
        if max_images is not None:
            if max_images < 1:
                raise IsplitError(f"max_images must be >= 1, got {max_images}")
            # A seeded shuffle before truncation keeps every class represented in small slices.
            g = torch.Generator().manual_seed(0)
            idx = idx[torch.randperm(idx.numel(), generator=g)][:max_images].sort().values
        return ImageSet(self.images[idx], self.labels[idx], self.class_names)

    def batches(
        self,
        batch_size: int,
        *,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images (B, C, S, S) float32 normalised, labels (B,) int64)``."""
        order = (
            torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(len(self))
        )
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield to_model_input(self.images[idx], input_size, mean, std), self.labels[idx]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels in [0, 1] (on up to 10,000 images)."""
        x = self.images[:10000].float() / 255.0
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def to_model_input(images: torch.Tensor, input_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize and normalise images: ``(N, C, H, W)`` uint8 -> ``(N, C, S, S)`` float32.

    Bilinear with antialiasing; pixel values scaled to [0, 1] then ``(x - mean) / std``.
    """
    x = images.float() / 255.0
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def pil_to_uint8(image: Image.Image, in_channels: int) -> torch.Tensor:
    """A PIL image as ``(C, H, W)`` uint8, converted to grayscale (C=1) or RGB (C=3)."""
    image = image.convert("L" if in_channels == 1 else "RGB")
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def preprocess_image(
    image: Image.Image, *, in_channels: int, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Preprocess one image exactly as in training: returns ``(C, S, S)`` float32."""
    return to_model_input(pil_to_uint8(image, in_channels)[None], input_size, mean, std)[0]


BUILTIN_CLASSES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "digits": tuple(str(d) for d in range(10)),
}


@dataclass(frozen=True)
class DatasetRef:
    """A dataset named by its spec string, parsed once.

    ``name`` is ``fashion-mnist``, ``digits`` or ``imagefolder``; ``folder`` is the image
    folder's path (absolute when parsed with a ``root``) for ``imagefolder``, else None.
    """

    name: str
    folder: Path | None = None

    @classmethod
    def parse(cls, spec: str, *, root: Path | None = None) -> DatasetRef:
        """Parse ``spec``. With ``root``, a relative folder is taken under it and a folder that
        resolves outside it, or does not exist, is refused (``IsplitError``)."""
        if spec in BUILTIN_CLASSES:
            return cls(spec)
        if not spec.startswith("imagefolder:"):
            raise IsplitError(f"unknown dataset {spec!r}; use one of: {DATASETS_HELP}")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in spec):  # a NUL makes every path call raise
            raise IsplitError(f"dataset {spec!r} contains a control character")
        folder = Path(spec.removeprefix("imagefolder:"))
        if root is None:
            return cls("imagefolder", folder)
        base = root.resolve()
        resolved = folder.resolve() if folder.is_absolute() else (base / folder).resolve()
        if not resolved.is_relative_to(base):
            raise IsplitError(f"dataset folder {str(folder)!r} is outside the data root {str(base)!r}")
        if not resolved.is_dir():
            raise IsplitError(f"dataset folder {str(folder)!r} does not exist under {str(base)!r}")
        return cls("imagefolder", (root / folder).resolve())

    @property
    def spec(self) -> str:
        """The spec string (``imagefolder:<folder>``), as messages and results carry it."""
        return f"imagefolder:{self.folder}" if self.folder is not None else self.name

    @property
    def builtin_classes(self) -> list[str] | None:
        """Class names of a built-in dataset, known without loading it; None for image folders."""
        names = BUILTIN_CLASSES.get(self.name)
        return list(names) if names is not None else None

    def load(self, split: str, *, in_channels: int | None = None) -> ImageSet:
        """The ``split`` ("train" or "test"); ``in_channels`` applies to image folders (default 3);
        the built-in datasets are grayscale, repeated to three channels when 3 are asked for (a
        model brought as an RGB torch.export program)."""
        if split not in ("train", "test"):
            raise IsplitError(f"split must be 'train' or 'test', got {split!r}")
        if self.name in ("fashion-mnist", "digits"):
            data = _fashion_mnist(split) if self.name == "fashion-mnist" else _digits(split)
            if in_channels == 3:
                data = ImageSet(data.images.expand(-1, 3, -1, -1).contiguous(), data.labels, data.class_names)
            return data
        assert self.folder is not None
        return _imagefolder(self.folder, split, in_channels or 3)


def load_dataset(spec: str, split: str, *, in_channels: int | None = None) -> ImageSet:
    """Load the ``split`` ("train" or "test") of a dataset given by its spec string."""
    return DatasetRef.parse(spec).load(split, in_channels=in_channels)


def resolve_classes(requested: Sequence[str | int] | None, class_names: Sequence[str]) -> list[int] | None:
    """Turn class indices or names into sorted unique indices; None stays None (all classes).

    An index is an ``int`` or a string of ASCII digits (``"7"``); other digits (``"²"``,
    ``"５"``, ``"٥"``) are names like any other string, and a bool is refused."""
    if requested is None:
        return None
    out: set[int] = set()
    for item in requested:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise IsplitError(f"class {item!r} is neither a class index nor a class name")
        text = str(item).strip()
        if text in class_names:  # an exact name wins, even a name made of digits
            idx = list(class_names).index(text)
        elif CLASS_INDEX.fullmatch(text):
            idx = int(text)
            if not 0 <= idx < len(class_names):
                raise IsplitError(f"class index {idx} out of range 0..{len(class_names) - 1}")
        else:
            raise IsplitError(f"unknown class {text[:100]!r}; known: {', '.join(class_names)}")
        out.add(idx)
    if not out:
        raise IsplitError("the class subset is empty")
    return sorted(out)


# -- Fashion-MNIST -------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise IsplitError(f"{path} is not an uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(base: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (base / name).exists():
            return base / name
    raise IsplitError(
        f"Fashion-MNIST not found under {base} (missing {stem}[.gz]); install it with "
        "`sudo apt-get install dataset-fashion-mnist` or set ISPLIT_FASHION_MNIST_DIR"
    )


def _fashion_mnist(split: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte"))
    return ImageSet(
        torch.from_numpy(images.copy())[:, None],
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
    )


# -- scikit-learn digits -------------------------------------------------------------------


def _digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    idx = np.sort(order[:cut] if split == "train" else order[cut:])
    return ImageSet(
        torch.from_numpy(images[idx])[:, None],
        torch.from_numpy(bunch.target[idx].astype(np.int64)),
        list(BUILTIN_CLASSES["digits"]),
    )


# -- image folders -------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise IsplitError(f"image folder {root} has no class sub-folders")
    return dirs


def _imagefolder(root: Path, split: str, in_channels: int) -> ImageSet:
    if not root.is_dir():
        raise IsplitError(f"image folder {root} does not exist or is not a directory")
    base = root
    if (root / "train").is_dir():  # explicit splits: train/ and test/ (or val/)
        names = {"train": ["train"], "test": ["test", "val"]}[split]
        base = next((root / d for d in names if (root / d).is_dir()), None)  # type: ignore[assignment]
        if base is None:
            raise IsplitError(f"image folder {root} has train/ but no test/ or val/ folder")
    class_dirs = _class_dirs(base)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    size: tuple[int, int] | None = None
    for label, cdir in enumerate(class_dirs):
        files = sorted(p for p in cdir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if base is root:
            # No explicit split: a stable 80/20 split by a hash of the file name.
            files = [p for p in files if _in_test(p.name) == (split == "test")]
        for path in files:
            try:
                with Image.open(path) as im:
                    if size is None:
                        size = im.size
                    img = im if im.size == size else im.resize(size, Image.BILINEAR)
                    images.append(pil_to_uint8(img, in_channels))
            except (UnidentifiedImageError, OSError) as exc:
                raise IsplitError(f"unreadable image {path}: {exc}") from exc
            labels.append(label)
    if not images:
        raise IsplitError(f"image folder {base} has no images for the {split} split")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs])


def _in_test(name: str) -> bool:
    return hashlib.sha1(name.encode()).digest()[0] < 52  # ~20 % of 256
