"""Datasets: CIFAR-10, (Fashion-)MNIST, image folders / EDM zip archives, two built-in synthetic
sets (antialiased shapes; a flat 2-D disk in R^D) and a built-in set of real-photo crops.

Item convention shared by every dataset in this module::

    ds[i] -> (image: Tensor[C, H, W] float32 in [-1, 1],
              label: Tensor[label_dim] float32 (one-hot class, or EDM float label);
                     Tensor[0] when the dataset is unconditional)

and every dataset exposes ``.resolution``, ``.num_channels``, ``.label_dim`` and ``len()``.
Pixels are mapped as in EDM: ``x = uint8 / 127.5 - 1``.

* CIFAR-10 is the paper's benchmark (docs/method.md section 6.1): 32x32x3, train split, unconditional.
  Files are the official python-pickle layout ``<root>/cifar-10-batches-py/``; they are read by our
  own small reader (no md5 checks, so tiny test files work) and downloaded with torchvision's
  download code when ``download=True``.
* The shapes data (one antialiased disk/square/triangle per image) is an explicit, differentiable
  function of a small parameter vector (``render_shapes``): the data manifold is known, which the
  small-scale metrics use (best-fit parameters, tangent spaces by autograd / finite differences).
* The disk data is the paper's synthetic tangent study (docs/method.md section 6.2): a flat
  2-D disk embedded in R^D by a random orthonormal 2-frame, with exact tangent/normal projections
  and distance to the manifold.
* The photos data are random crops of the real photographs that ship inside scikit-image (no
  download; sources and licences in ``PHOTO_SOURCES``), labelled with their photograph, with a
  held-out strip of every photograph for a test split whose crops never overlap training crops.
* Image folders and zips are validated when the dataset is built (before training starts): every
  file is decoded once; errors name the file and the setting that changes the behaviour.

All random generation uses a local ``torch.Generator`` seeded from the ``seed`` argument (the same
seed gives bitwise identical data); no global RNG state is read or modified.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DatasetNotFoundError", "ImageDataset", "InMemoryImageDataset", "CIFAR10Dataset", "MNISTDataset",
    "ImageFolderDataset", "ImageZipDataset", "ShapesDataset", "DiskDataset", "DiskData",
    "SHAPE_KINDS", "SHAPE_SYMMETRY_ORDERS", "SHAPE_PARAM_NAMES", "CIFAR10_CLASSES",
    "load_cifar10_arrays", "load_mnist_arrays", "read_idx", "make_shapes", "render_shapes",
    "sample_shape_params", "pad_or_resize_28", "sdf_disk", "sdf_square", "sdf_triangle", "make_disk", "as_tensors",
    "get_dataset", "DATASET_NAMES", "default_data_root", "PhotoCropsDataset", "PhotoSource", "PHOTO_SOURCES",
    "PHOTO_NAMES", "PHOTO_DOWNSCALE", "PHOTO_TEST_FRACTION", "load_photos", "make_photo_crops", "photo_regions",
    "photo_cache_key", "dataset_kwargs", "SPLIT_DATASETS", "LABEL_SOURCES",
]


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are missing (and were not, or could not be, downloaded).

    The message names the exact path that was expected and how to obtain the data.
    """


def default_data_root() -> str:
    """Root for downloadable datasets when none is given: ``$AYT_DATA_ROOT`` or ``./data``."""
    return os.environ.get("AYT_DATA_ROOT", "data")


# ----------------------------------------------------------------------------------------------
# Small helpers.

def _uint8_to_float(x: Tensor) -> Tensor:
    """uint8 [..., C, H, W] in [0, 255] -> float32 in [-1, 1] (EDM: x / 127.5 - 1)."""
    return x.to(torch.float32) / 127.5 - 1.0


def _one_hot(index: Tensor, num_classes: int) -> Tensor:
    """int64 [N] -> float32 [N, num_classes]."""
    return F.one_hot(index.to(torch.int64), num_classes).to(torch.float32)


def _resize_uint8(images: Tensor, resolution: int | tuple[int, int], chunk: int = 1024) -> Tensor:
    """Resize uint8 [N, C, H, W] to [N, C, R, R] (or [N, C, h, w] for ``resolution=(h, w)``), rounded to
    uint8. Bilinear with antialiasing: when shrinking, a triangle filter as wide as the scale factor (close
    to averaging each output pixel's area), so no aliasing; when enlarging, plain bilinear."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    out = []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float32)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    if not out:
        return images.new_zeros((0, images.shape[1], *size))
    return torch.cat(out)


def _center_crop_square(x: Tensor) -> Tensor:
    """[..., H, W] -> [..., S, S] with S = min(H, W): the central square (the longer side is cut evenly)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top:top + s, left:left + s]


def _check_resolution(name: str, native: int, requested: int | None, resize: bool) -> int:
    """Resolve the output resolution; a mismatch without resize is an error (no silent resize)."""
    if requested is None or requested == native:
        return native
    if not resize:
        raise ValueError(
            f"{name}: images are {native}x{native} but data.resolution={requested}; set data.resize=true "
            f"(get_dataset(..., resize=True)) to resize them (antialiased), or data.resolution={native}.")
    if requested < 1:
        raise ValueError(f"{name}: resolution must be positive, got {requested}")
    return int(requested)


def _labels_from_raw(raw: Tensor | None, conditional: bool, name: str,
                     num_classes: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Build the per-item label matrix.

    Args:
        raw: int64 [N] class indices, float32 [N, L] label vectors, or None (no labels).
        conditional: when False the labels are empty ([N, 0]) whatever ``raw`` holds.
        num_classes: one-hot width for class indices (default max index + 1).
    Returns:
        (labels float32 [N, label_dim], class_index int64 [N] or None)
    """
    class_index = raw if (raw is not None and raw.dtype == torch.int64) else None
    if not conditional:
        n = 0 if raw is None else raw.shape[0]
        return torch.zeros(n, 0), class_index
    if raw is None:
        raise ValueError(f"{name}: conditional=True but the dataset has no labels")
    if raw.dtype == torch.int64:
        if raw.numel() and raw.min() < 0:
            raise ValueError(f"{name}: class labels must be non-negative")
        k = num_classes if num_classes is not None else (int(raw.max()) + 1 if raw.numel() else 0)
        return _one_hot(raw, k), class_index
    return raw.to(torch.float32), None


# ----------------------------------------------------------------------------------------------
# Base classes.

class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``ds[i] -> (image float32 [C, H, W] in [-1, 1], label float32 [label_dim])``.

    Subclasses set ``self.labels`` (float32 [N, label_dim]), ``self.class_index`` (int64 [N] or
    None), ``self._resolution``, ``self._num_channels`` and implement ``_image(i)``.
    """

    name: str = "dataset"
    labels: Tensor
    class_index: Tensor | None = None
    _resolution: int
    _num_channels: int

    @property
    def resolution(self) -> int:
        """Image height = width in pixels."""
        return self._resolution

    @property
    def num_channels(self) -> int:
        return self._num_channels

    @property
    def label_dim(self) -> int:
        """Width of the label vector; 0 for unconditional datasets."""
        return int(self.labels.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _image(self, i: int) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} of length {n}")
        return self._image(i), self.labels[i].clone()

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All items at once: (images float32 [N, C, H, W], labels float32 [N, label_dim])."""
        if len(self) == 0:
            r = self.resolution
            return torch.zeros(0, self.num_channels, r, r), self.labels.clone()
        return torch.stack([self._image(i) for i in range(len(self))]), self.labels.clone()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, resolution={self.resolution}, "
                f"num_channels={self.num_channels}, label_dim={self.label_dim})")


class InMemoryImageDataset(ImageDataset):
    """Images held as one uint8 tensor [N, C, R, R]; converted to [-1, 1] per item (fast).

    Args:
        images: uint8 [N, C, R, R].
        raw_labels: int64 [N] class indices, float32 [N, L] label vectors, or None.
        conditional: return labels (one-hot for class indices) instead of empty Tensor[0].
        num_classes: one-hot width (default: max class index + 1).
    """

    def __init__(self, images: Tensor, raw_labels: Tensor | None = None, conditional: bool = False,
                 num_classes: int | None = None, name: str = "in-memory"):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"{name}: images must be uint8 [N, C, R, R], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if raw_labels is not None and raw_labels.shape[0] != images.shape[0]:
            raise ValueError(f"{name}: {images.shape[0]} images but {raw_labels.shape[0]} labels")
        self.name = name
        self.images = images.contiguous()
        self.labels, self.class_index = _labels_from_raw(raw_labels, conditional, name, num_classes)
        if not conditional:
            self.labels = torch.zeros(images.shape[0], 0)
        self._resolution = int(images.shape[-1])
        self._num_channels = int(images.shape[1])

    def _image(self, i: int) -> Tensor:
        return _uint8_to_float(self.images[i])

    def tensors(self) -> tuple[Tensor, Tensor]:
        return _uint8_to_float(self.images), self.labels.clone()


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (official python-pickle layout).

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}


def _cifar10_source() -> tuple[str, str, str]:
    """(url, archive filename, archive md5) from torchvision's CIFAR10 class."""
    from torchvision.datasets import CIFAR10
    return CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle batch -> (uint8 [n, 3, 32, 32], int64 [n])."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise ValueError(f"{path}: not a CIFAR-10 batch (keys {sorted(entry)}; expected 'data', 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [n, 3072], got {data.shape}")
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_arrays(root: str, split: str = "train", download: bool = False) -> tuple[Tensor, Tensor]:
    """Read CIFAR-10 from ``<root>/cifar-10-batches-py`` -> (uint8 [N, 3, 32, 32], int64 [N]).

    The train split concatenates ``data_batch_1..5`` (50k images), the test split is ``test_batch``
    (10k). With ``download=True`` missing files are fetched with torchvision's download code
    (``download_and_extract_archive``, md5-checked archive). No md5 check is applied to the
    extracted batch files, so small hand-made files in the same layout load too.
    """
    if split not in _CIFAR10_FILES:
        raise ValueError(f"CIFAR-10 split must be one of {sorted(_CIFAR10_FILES)}, got {split!r}")
    folder = os.path.join(root, _CIFAR10_DIR)
    paths = [os.path.join(folder, name) for name in _CIFAR10_FILES[split]]
    url, filename, md5 = _cifar10_source()
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(url, root, filename=filename, md5=md5)
        except Exception as exc:  # network errors (URLError, OSError, RuntimeError) when offline
            raise DatasetNotFoundError(
                f"CIFAR-10: download of {url} into {os.path.abspath(root)!r} failed ({exc!r}). Download "
                f"and extract the archive by hand so that {os.path.abspath(folder)!r} holds "
                f"{', '.join(_CIFAR10_FILES['train'] + _CIFAR10_FILES['test'])}.") from exc
        missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 ({split}) not found: expected {os.path.abspath(folder)!r} to contain "
            f"{', '.join(_CIFAR10_FILES[split])} (missing: {', '.join(os.path.basename(p) for p in missing)}). "
            f"Pass download=True, or download {url} and extract it into {os.path.abspath(root)!r}.")
    batches = [_read_cifar_batch(p) for p in paths]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return images, labels


class CIFAR10Dataset(InMemoryImageDataset):
    """CIFAR-10 (Krizhevsky 2009), 32x32x3, 10 classes; the paper's benchmark (docs/method.md section 6.1).

    Args:
        root: directory that holds (or will hold) ``cifar-10-batches-py``; default ``default_data_root()``.
        split: 'train' (50k, the paper's FID reference and training set) or 'test' (10k).
        resolution: None or 32; another value requires ``resize=True`` (bilinear, antialiased).
        download: fetch the archive with torchvision when missing.
        conditional: labels one-hot [10] instead of Tensor[0].
    """

    def __init__(self, root: str | None = None, split: str = "train", resolution: int | None = None,
                 download: bool = False, conditional: bool = False, resize: bool = False):
        root = default_data_root() if root is None else str(root)
        res = _check_resolution("CIFAR-10", 32, resolution, resize)
        images, labels = load_cifar10_arrays(root, split, download)
        if res != 32:
            images = _resize_uint8(images, res)
        super().__init__(images, labels, conditional=conditional, num_classes=10, name=f"cifar10-{split}")
        self.root, self.split = root, split


# ----------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (raw idx layout, as torchvision stores it).

_MNIST_VARIANTS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> Tensor:
    """Read an IDX file (LeCun's MNIST format; gzip-compressed if the name ends in .gz) of uint8 data.

    Layout: 2 zero bytes, type code 0x08 (uint8), number of dims d, then d big-endian uint32
    sizes, then the data in C order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only uint8 IDX data (type 0x08) is supported, got type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header says shape {shape} ({count} bytes) but {len(raw) - offset} data bytes")
    data = np.frombuffer(raw, dtype=np.uint8, count=count, offset=offset).reshape(shape)
    return torch.from_numpy(data.copy())


def _find_idx(raw_folder: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(raw_folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_mnist_arrays(root: str, split: str = "train", variant: str = "mnist",
                      download: bool = False) -> tuple[Tensor, Tensor]:
    """Read MNIST / Fashion-MNIST from torchvision's raw layout -> (uint8 [N, 28, 28], int64 [N]).

    Files: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or ``FashionMNIST``;
    the ``.gz`` files are read too). ``download=True`` fetches them with torchvision's download
    code, mirror list and md5 sums.
    """
    if variant not in _MNIST_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(_MNIST_VARIANTS)}, got {variant!r}")
    if split not in _MNIST_FILES:
        raise ValueError(f"{variant} split must be one of {sorted(_MNIST_FILES)}, got {split!r}")
    import torchvision.datasets as tvd
    tv_cls = getattr(tvd, _MNIST_VARIANTS[variant])
    raw_folder = os.path.join(root, _MNIST_VARIANTS[variant], "raw")
    names = _MNIST_FILES[split]
    paths = [_find_idx(raw_folder, n) for n in names]
    if None in paths and download:
        from torchvision.datasets.utils import download_and_extract_archive
        os.makedirs(raw_folder, exist_ok=True)
        for filename, md5 in tv_cls.resources:
            if _find_idx(raw_folder, os.path.splitext(filename)[0]) is not None:
                continue
            errors = []
            for mirror in tv_cls.mirrors:
                try:
                    download_and_extract_archive(mirror + filename, raw_folder, filename=filename, md5=md5)
                    break
                except Exception as exc:  # offline / mirror down: try the next mirror
                    errors.append(f"{mirror + filename}: {exc!r}")
            else:
                raise DatasetNotFoundError(
                    f"{variant}: download failed ({'; '.join(errors)}). Place the files "
                    f"{', '.join(n for pair in _MNIST_FILES.values() for n in pair)} (optionally .gz) "
                    f"in {os.path.abspath(raw_folder)!r}.")
        paths = [_find_idx(raw_folder, n) for n in names]
    if None in paths:
        missing = [n for n, p in zip(names, paths) if p is None]
        raise DatasetNotFoundError(
            f"{variant} ({split}) not found: expected {', '.join(names)} (or .gz) in "
            f"{os.path.abspath(raw_folder)!r} (missing: {', '.join(missing)}). Pass download=True, or "
            f"download them from {tv_cls.mirrors[0]} into that directory.")
    images, labels = read_idx(paths[0]), read_idx(paths[1]).to(torch.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{variant}: bad shapes images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    return images, labels


def pad_or_resize_28(images: Tensor, resolution: int, mode: str) -> Tensor:
    """uint8 [N, 1, 28, 28] -> uint8 [N, 1, R, R].

    ``mode='pad'``: zero (= black = -1 after scaling) padding, centred; (R - 28) must be even and >= 0.
    ``mode='resize'``: bilinear, antialiased.
    """
    h = images.shape[-1]
    if mode == "pad":
        extra = resolution - h
        if extra < 0 or extra % 2:
            raise ValueError(f"mnist_mode='pad' needs resolution >= {h} with an even difference, "
                             f"got resolution={resolution}; set data.resize=true (mnist_mode='resize') to "
                             f"resize the 28x28 digits instead")
        p = extra // 2
        return F.pad(images, (p, p, p, p), value=0)
    if mode == "resize":
        return images if resolution == h else _resize_uint8(images, resolution)
    raise ValueError(f"mnist_mode must be 'pad' or 'resize', got {mode!r}")


class MNISTDataset(InMemoryImageDataset):
    """MNIST or Fashion-MNIST, 28x28 grey images padded (default) or resized to ``resolution``.

    Args:
        root: directory that holds ``MNIST/raw`` / ``FashionMNIST/raw``; default ``default_data_root()``.
        variant: 'mnist' or 'fashion-mnist'.
        split: 'train' (60k) or 'test' (10k).
        resolution: output size, default 32.
        mnist_mode: 'pad' (zero-pad 28 -> 32, i.e. 2 px of -1 each side) or 'resize'.
        rgb: repeat the grey channel to 3 channels.
        download, conditional: as for CIFAR10Dataset.
    """

    def __init__(self, root: str | None = None, variant: str = "mnist", split: str = "train",
                 resolution: int | None = None, download: bool = False, conditional: bool = False,
                 mnist_mode: str = "pad", rgb: bool = False):
        root = default_data_root() if root is None else str(root)
        resolution = 32 if resolution is None else int(resolution)
        if mnist_mode not in ("pad", "resize"):
            raise ValueError(f"mnist_mode must be 'pad' or 'resize', got {mnist_mode!r}")
        images, labels = load_mnist_arrays(root, split, variant, download)
        images = pad_or_resize_28(images[:, None], resolution, mnist_mode)
        if rgb:
            images = images.expand(-1, 3, -1, -1)
        super().__init__(images, labels, conditional=conditional, num_classes=10, name=f"{variant}-{split}")
        self.root, self.split, self.variant = root, split, variant


# ----------------------------------------------------------------------------------------------
# Image folders and EDM-style zip archives.

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# PIL mode -> (mode to convert to, channels)
_MODE_CHANNELS = {"1": ("L", 1), "L": ("L", 1), "P": ("RGB", 3), "RGB": ("RGB", 3), "RGBA": ("RGBA", 4)}
_CHANNEL_KIND = {1: "grayscale", 3: "RGB", 4: "RGBA"}
LABEL_SOURCES = ("auto", "json", "folders", "none")


def _is_hidden(name: str) -> bool:
    """A '/'-separated relative path that no dataset should read: a part starting with '.' (.DS_Store,
    .ipynb_checkpoints/, macOS' AppleDouble ._x.png) or the __MACOSX/ folder of zips made by Finder."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))
_PROGRESS_FILES = 2000  # validating at least this many files reports progress (about a second of decoding)


class _FileImageDataset(ImageDataset):
    """Shared logic of ImageFolderDataset / ImageZipDataset: listing, validation, labels, decoding.

    Validation happens here, before any training starts: every image is decoded once (``verify``),
    so an empty folder, unreadable or corrupt files, mixed channel counts (grayscale next to RGB) and
    mixed or non-square sizes are reported with the file they concern. Unreadable files stop the
    construction unless ``skip_unreadable`` (then they are dropped and counted in a printed line).
    Mixed channel counts are always an error: converting grayscale files to RGB (or back) would change
    the data distribution silently, so the files must be converted by hand first.
    """

    def __init__(self, path: str, resolution: int | None, conditional: bool, labels: str,
                 resize: bool, verify: bool, skip_unreadable: bool = False):
        if labels not in LABEL_SOURCES:
            raise ValueError(f"data.labels must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
        self.path = str(path)
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]
        all_names = self._list_files()
        hidden = {n for n in all_names if _is_hidden(n)}
        all_names -= hidden
        self.image_names = sorted(n for n in all_names if n.lower().endswith(_IMAGE_EXTENSIONS))
        hidden_images = sorted(n for n in hidden if n.lower().endswith(_IMAGE_EXTENSIONS))
        if hidden_images:  # e.g. macOS' AppleDouble files ._x.png, or __MACOSX/ in a zip made by Finder
            print(f"[data] {self.path}: ignored {len(hidden_images)} hidden image file(s) (a path part starts "
                  f"with '.' or is __MACOSX), e.g. {hidden_images[0]}", flush=True)
        if not self.image_names:
            others = sorted(n for n in all_names if n != "dataset.json")
            what = (f"it holds {len(others)} other file(s), e.g. {', '.join(others[:3])}" if others
                    else "it is empty")
            raise ValueError(f"{self.path}: no image files ({', '.join(_IMAGE_EXTENSIONS)}) found: {what}. "
                             f"Point data.root at a directory (data.name=folder) or EDM-style zip "
                             f"(data.name=zip) of PNG/JPEG images.")

        infos = self._scan(verify, skip_unreadable)  # name -> (width, height, channels)
        kinds: dict[int, str] = {}
        for n, (_w, _h, c) in infos.items():
            kinds.setdefault(c, n)
        if len(kinds) > 1:
            raise ValueError(
                f"{self.path}: images have different channel counts: "
                + ", ".join(f"{n} is {_CHANNEL_KIND[c]} ({c} channel{'s' * (c > 1)})" for c, n in kinds.items())
                + ". A dataset needs one kind; grayscale files are not converted silently (that would change "
                  "the data). Convert the files first, e.g. with PIL: Image.open(f).convert('RGB').save(f).")
        self._num_channels = next(iter(kinds))
        self._mode = {1: "L", 3: "RGB", 4: "RGBA"}[self._num_channels]

        sizes: dict[tuple[int, int], str] = {}
        for n, (w, h, _c) in infos.items():
            sizes.setdefault((w, h), n)
        square = [s for s in sizes if s[0] == s[1]]
        uniform = len(sizes) == 1 and len(square) == 1
        if uniform:
            native = square[0][0]
            self._native: int | None = native
            self._resolution = _check_resolution(self.path, native, resolution, resize)
        else:
            examples = ", ".join(f"{n} is {w}x{h}" for (w, h), n in list(sizes.items())[:4])
            if not resize or resolution is None:
                raise ValueError(
                    f"{self.path}: images have different or non-square sizes ({examples}; {len(sizes)} sizes in "
                    f"all). Set data.resize=true (get_dataset(..., resize=True)) with data.resolution=R to "
                    f"centre-crop each image to a square and resize it to RxR (antialiased).")
            self._native, self._resolution = None, int(resolution)
        if resize and self._native != self._resolution:
            off = sum(1 for w, h, _c in infos.values() if not (w == h == self._resolution))
            cropped = sum(1 for w, h, _c in infos.values() if w != h)
            print(f"[data] {self.path}: {off} of {len(infos)} images are not {self._resolution}x{self._resolution}: "
                  f"resized to it (antialiased) because data.resize=true"
                  + (f"; {cropped} non-square images are centre-cropped to a square first" if cropped else ""),
                  flush=True)

        raw = self._read_labels(labels, all_names)
        self.labels, self.class_index = _labels_from_raw(raw, conditional, self.path)
        if not conditional:
            self.labels = torch.zeros(len(self.image_names), 0)

    # -- validation ----------------------------------------------------------------------------
    def _scan(self, verify: bool, skip_unreadable: bool) -> dict[str, tuple[int, int, int]]:
        """Size and channels of every image (decoding each one fully when ``verify``); unreadable files
        raise, or are dropped from ``self.image_names`` with a printed count when ``skip_unreadable``."""
        from .progress import Progress
        names = self.image_names if verify else self.image_names[:1]
        infos, bad = {}, []
        bar = Progress(len(names), f"[data] checking {self.path}", "img") if len(names) >= _PROGRESS_FILES else None
        for n in names:
            try:
                with self._open(n) as f, PIL.Image.open(f) as img:
                    if verify:
                        img.load()  # full decode: truncated / corrupt data fails here
                    mode, size = img.mode, img.size
            except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), zlib / zip CRC errors
                bad.append((n, f"{type(exc).__name__}: {exc}"))
                continue
            if mode not in _MODE_CHANNELS:
                raise ValueError(f"{self.path}: {n} has the unsupported PIL mode {mode!r} (supported: "
                                 f"{', '.join(sorted(_MODE_CHANNELS))}); convert it to RGB or grayscale (L).")
            infos[n] = (size[0], size[1], _MODE_CHANNELS[mode][1])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if bad:
            listing = "; ".join(f"{n} ({why})" for n, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
            if not skip_unreadable:
                raise ValueError(f"{self.path}: {len(bad)} of {len(names)} image files cannot be read: {listing}. "
                                 f"Remove or replace them, or set data.skip_unreadable=true to skip them.")
            if len(bad) == len(names):
                raise ValueError(f"{self.path}: none of the {len(names)} image files can be read: {listing}.")
            skipped = {n for n, _ in bad}
            self.image_names = [n for n in self.image_names if n not in skipped]
            print(f"[data] {self.path}: skipped {len(bad)} unreadable image file(s) of {len(names)} because "
                  f"data.skip_unreadable=true: {listing}", flush=True)
        return infos

    # -- labels --------------------------------------------------------------------------------
    def _read_labels(self, source: str, all_names: set[str]) -> Tensor | None:
        if source == "none":
            return None
        if source == "folders":
            tops = [n.split("/")[0] if "/" in n else None for n in self.image_names]
            if None in tops:
                bad = self.image_names[tops.index(None)]
                raise ValueError(f"{self.path}: data.labels=folders but {bad} is not inside a class subfolder")
            self.class_names = sorted(set(tops))
            lookup = {c: k for k, c in enumerate(self.class_names)}
            return torch.tensor([lookup[t] for t in tops], dtype=torch.int64)
        if "dataset.json" not in all_names:
            if source == "json":
                raise ValueError(f"{self.path}: data.labels=json but there is no dataset.json")
            return None
        with self._open("dataset.json") as f:
            meta = json.load(f)
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if entries is None:
            if source == "json":
                raise ValueError(f"{self.path}: dataset.json has no 'labels' entry")
            return None
        table = {str(k).replace("\\", "/"): v for k, v in entries}
        missing = [n for n in self.image_names if n not in table]
        if missing:
            raise ValueError(f"{self.path}: dataset.json has no label for {len(missing)} images, "
                             f"e.g. {missing[0]}")
        values = np.array([table[n] for n in self.image_names])
        if values.ndim == 1:
            return torch.from_numpy(values.astype(np.int64))
        if values.ndim == 2:
            return torch.from_numpy(values.astype(np.float32))
        raise ValueError(f"{self.path}: dataset.json labels must be ints or 1-D lists, got ndim={values.ndim}")

    # -- images --------------------------------------------------------------------------------
    def _list_files(self) -> set[str]:
        raise NotImplementedError

    def _open(self, name: str):
        raise NotImplementedError

    def _image(self, i: int) -> Tensor:
        name = self.image_names[i]
        try:
            with self._open(name) as f, PIL.Image.open(f) as img:
                mode = img.mode
                arr = np.array(img.convert(self._mode), dtype=np.uint8) if mode in _MODE_CHANNELS else None
        except Exception as exc:  # the file changed after validation
            raise ValueError(f"{self.path}: {name} cannot be read as an image ({type(exc).__name__}: {exc})") from exc
        if arr is None or _MODE_CHANNELS[mode][1] != self._num_channels:
            raise ValueError(f"{self.path}: {name} has mode {mode!r}, expected {self._num_channels} channels")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr).permute(2, 0, 1)  # HWC -> CHW
        if tuple(x.shape[-2:]) != (self._resolution, self._resolution):
            if self._native is not None and self._resolution == self._native:
                raise ValueError(f"{self.path}: {name} is {x.shape[-1]}x{x.shape[-2]}, expected "
                                 f"{self._native}x{self._native}")
            x = _resize_uint8(_center_crop_square(x)[None], self._resolution)[0]
        return _uint8_to_float(x)


class ImageFolderDataset(_FileImageDataset):
    """Images (PNG/JPG) found recursively under a directory, sorted by relative path.

    Args:
        path: the directory.
        resolution: expected resolution; a mismatch raises unless ``resize=True``.
        conditional: return labels (one-hot for class indices; float vectors as stored).
        labels: 'auto' (``dataset.json`` if present, else none), 'json' (required), 'folders'
            (class = sorted top-level subfolder name), 'none'.
        resize: centre-crop non-square images to a square and resize (bilinear, antialiased) every image
            that is not ``resolution`` x ``resolution``, instead of raising.
        verify: decode every image once to find unreadable files and check sizes / channels (False
            checks only the first file's header).
        skip_unreadable: drop unreadable / corrupt files (printed count) instead of raising.

    ``dataset.json`` is EDM's format: ``{"labels": [["00000/img00000000.png", 6], ...]}`` with paths
    relative to ``path`` using '/' separators.
    """

    def __init__(self, path: str, resolution: int | None = None, conditional: bool = False,
                 labels: str = "auto", resize: bool = False, verify: bool = True, skip_unreadable: bool = False):
        if not os.path.isdir(path):
            hint = " (it is a file: for an EDM-style zip use data.name=zip)" if os.path.isfile(path) else ""
            raise DatasetNotFoundError(f"image folder not found: expected a directory at {os.path.abspath(path)!r}"
                                       f"{hint}")
        super().__init__(path, resolution, conditional, labels, resize, verify, skip_unreadable)

    def _list_files(self) -> set[str]:
        names = set()
        for root, _dirs, files in os.walk(self.path):
            for fname in files:
                rel = os.path.relpath(os.path.join(root, fname), start=self.path)
                names.add(rel.replace(os.sep, "/"))
        return names

    def _open(self, name: str):
        return open(os.path.join(self.path, *name.split("/")), "rb")


class ImageZipDataset(_FileImageDataset):
    """EDM-style zip archive of images (as written by EDM's ``dataset_tool.py``) + optional dataset.json.

    The archive is opened lazily, once per process (so each DataLoader worker gets its own handle)
    and the dataset pickles without it. Arguments as for ``ImageFolderDataset``.
    """

    def __init__(self, path: str, resolution: int | None = None, conditional: bool = False,
                 labels: str = "auto", resize: bool = False, verify: bool = True, skip_unreadable: bool = False):
        if os.path.isdir(path):
            raise ValueError(f"data.name=zip expects a zip archive but {os.path.abspath(path)!r} is a directory; "
                             f"for a directory of images use data.name=folder")
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"zip dataset not found: expected a file at {os.path.abspath(path)!r}")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{os.path.abspath(path)!r} is not a zip archive (data.name=zip expects an EDM-style "
                             f"zip of images, as written by EDM's dataset_tool.py); for a directory of images use "
                             f"data.name=folder")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        super().__init__(path, resolution, conditional, labels, resize, verify, skip_unreadable)

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as exc:
                raise ValueError(f"{self.path}: not a readable zip archive ({exc})") from exc
            self._zip_pid = os.getpid()
        return self._zip

    def _list_files(self) -> set[str]:
        return {n for n in self._zipfile().namelist() if not n.endswith("/")}

    def _open(self, name: str):
        # Read the member fully: PIL may seek, and zip members are small.
        return io.BytesIO(self._zipfile().read(name))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        self._zip, self._zip_pid = None, None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Built-in data (a): antialiased shapes, an explicit function of a parameter vector.

SHAPE_KINDS = ("disk", "square", "triangle")
SHAPE_SYMMETRY_ORDERS = (0, 4, 3)  # rotational symmetry order k per kind (0: rotation-invariant)
SHAPE_PARAM_NAMES = (
    "kind_disk", "kind_square", "kind_triangle",  # one-hot kind
    "cx", "cy",  # centre, in image-width units (x: column, y: row; image spans [0, 1])
    "size",  # circumradius in image-width units (disk radius, square half-diagonal, triangle circumradius)
    "cos_ktheta", "sin_ktheta",  # orientation (cos k*theta, sin k*theta); (0, 0) for the disk
    "fg_r", "fg_g", "fg_b",  # foreground colour in [0, 1]
    "bg_r", "bg_g", "bg_b",  # background colour in [0, 1]
)
_CENTRE_RANGE = (0.25, 0.75)  # [4, 12] px at 16 px
_SIZE_RANGE = (2.5 / 16, 5.5 / 16)  # 2.5-5.5 px at 16 px
_MIN_CONTRAST = 0.6  # max_c |fg_c - bg_c| >= 0.6


def _safe_norm(x: Tensor, y: Tensor) -> Tensor:
    """sqrt(x^2 + y^2) with a finite gradient at the origin."""
    return (x * x + y * y).clamp_min(1e-12).sqrt()


def sdf_disk(ux: Tensor, uy: Tensor, size: Tensor) -> Tensor:
    """Signed distance to a disk of radius ``size`` at the origin (negative inside)."""
    return _safe_norm(ux, uy) - size


def sdf_square(ux: Tensor, uy: Tensor, size: Tensor) -> Tensor:
    """Exact signed distance to the axis-aligned square of half-diagonal ``size`` (half-side size/sqrt 2)."""
    a = size / math.sqrt(2.0)
    qx, qy = ux.abs() - a, uy.abs() - a
    outside = _safe_norm(qx.clamp_min(0), qy.clamp_min(0)) * ((qx > 0) | (qy > 0))
    return outside + torch.maximum(qx, qy).clamp_max(0)


def sdf_triangle(ux: Tensor, uy: Tensor, size: Tensor) -> Tensor:
    """Exact signed distance to the equilateral triangle of circumradius ``size`` centred (centroid) at
    the origin, with one apex on the +y axis (vertices (0, s), (+-s sqrt3/2, -s/2)).

    Closed form: fold by the mirror symmetries to one edge, then distance to that segment
    (the classical construction, e.g. I. Quilez's 2-D distance functions).
    """
    k = math.sqrt(3.0)
    r = size * (k / 2)  # half side length
    px = ux.abs() - r
    py = uy + r / k  # shift so the base edge (y = -s/2) lies on py = 0
    fold = (px + k * py) > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.clamp(px, min=-2 * r, max=torch.zeros_like(px))  # distance to the folded edge segment
    return -_safe_norm(px, py) * torch.sign(py)


_SDFS: tuple[Callable[[Tensor, Tensor, Tensor], Tensor], ...] = (sdf_disk, sdf_square, sdf_triangle)


def render_shapes(params: Tensor, resolution: int = 16) -> Tensor:
    """Render shape parameters to images; differentiable w.r.t. every continuous parameter.

    Args:
        params: float [n, 14], columns ``SHAPE_PARAM_NAMES``. The kind columns are blend weights of
            the three shapes' coverages (one-hot for data; soft weights interpolate).
        resolution: R; pixel (row i, column j) has its centre at ((j + 0.5)/R, (i + 0.5)/R).
    Returns:
        images float [n, 3, R, R] in [-1, 1]: ``2 * (bg + alpha * (fg - bg)) - 1`` with coverage
        ``alpha = clamp(0.5 - R * sdf, 0, 1)`` (a linear ramp 1 px wide centred on the edge).

    Rotation: the shape is rotated by theta, recovered as ``atan2(sin k theta, cos k theta) / k``
    (exact up to the shape's symmetry, so the image is unique); local coordinates
    ``u = R(-theta) (p - c)``. At theta = 0 the square is axis-aligned and the triangle's apex points
    toward increasing row index (downward in the image).
    """
    if params.ndim != 2 or params.shape[1] != len(SHAPE_PARAM_NAMES):
        raise ValueError(f"params must be [n, {len(SHAPE_PARAM_NAMES)}], got {tuple(params.shape)}")
    n, R = params.shape[0], int(resolution)
    kind_w = params[:, 0:3, None, None]  # [n, 3, 1, 1]
    cx, cy, size = (params[:, j, None, None] for j in (3, 4, 5))  # [n, 1, 1]
    c, s = params[:, 6, None, None], params[:, 7, None, None]
    fg, bg = params[:, 8:11, None, None], params[:, 11:14, None, None]  # [n, 3, 1, 1]

    coords = (torch.arange(R, device=params.device, dtype=params.dtype) + 0.5) / R
    py, px = coords[None, :, None], coords[None, None, :]  # rows, columns -> broadcast [1, R, R]
    dx, dy = px - cx, py - cy  # [n, R, R]

    # Angle from (cos k theta, sin k theta); the double-where keeps gradients finite at (0, 0).
    zero = (c == 0) & (s == 0)
    phi = torch.atan2(torch.where(zero, torch.zeros_like(s), s), torch.where(zero, torch.ones_like(c), c))
    alpha = torch.zeros(n, R, R, device=params.device, dtype=params.dtype)
    for kind, (sdf, order) in enumerate(zip(_SDFS, SHAPE_SYMMETRY_ORDERS)):
        if order == 0:
            ux, uy = dx, dy
        else:
            theta = phi / order
            ct, st = torch.cos(theta), torch.sin(theta)
            ux, uy = ct * dx + st * dy, -st * dx + ct * dy
        cover = (0.5 - R * sdf(ux, uy, size)).clamp(0, 1)
        alpha = alpha + kind_w[:, kind] * cover
    img01 = bg + alpha[:, None] * (fg - bg)  # [n, 3, R, R]
    return img01 * 2 - 1


def sample_shape_params(n: int, generator: torch.Generator) -> Tensor:
    """Draw ``n`` shape parameter vectors [n, 14] (columns ``SHAPE_PARAM_NAMES``).

    kind ~ U{disk, square, triangle}; centre ~ U[0.25, 0.75]^2; size ~ U[2.5/16, 5.5/16];
    theta ~ U[0, 2 pi); fg, bg ~ U[0, 1]^3, redrawn (vectorised) until max_c |fg_c - bg_c| >= 0.6.
    """
    g = generator
    kind = torch.randint(0, 3, (n,), generator=g)
    centre = _CENTRE_RANGE[0] + (_CENTRE_RANGE[1] - _CENTRE_RANGE[0]) * torch.rand(n, 2, generator=g)
    size = _SIZE_RANGE[0] + (_SIZE_RANGE[1] - _SIZE_RANGE[0]) * torch.rand(n, 1, generator=g)
    theta = 2 * math.pi * torch.rand(n, generator=g)
    colours = torch.rand(n, 6, generator=g)
    bad = (colours[:, :3] - colours[:, 3:]).abs().amax(1) < _MIN_CONTRAST
    while bool(bad.any()):  # acceptance ~0.41 per draw, so a few dozen rounds at most
        idx = bad.nonzero().squeeze(1)
        colours[idx] = torch.rand(idx.numel(), 6, generator=g)
        bad[idx] = (colours[idx, :3] - colours[idx, 3:]).abs().amax(1) < _MIN_CONTRAST
    order = torch.tensor(SHAPE_SYMMETRY_ORDERS, dtype=torch.float32)[kind]
    orient = torch.stack([torch.cos(order * theta), torch.sin(order * theta)], 1)
    orient = orient * (order > 0).to(torch.float32)[:, None]  # disk: (0, 0)
    return torch.cat([_one_hot(kind, 3), centre, size, orient, colours], 1)


def make_shapes(n: int, resolution: int = 16, seed: int = 0, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Deterministic shapes data: (images float32 [n, 3, R, R] in [-1, 1], params float32 [n, 14]).

    ``images == render_shapes(params, R)``; geometry is resolution-independent (image-width units),
    so the centre spans [R/4, 3R/4] px and the size 2.5R/16-5.5R/16 px at any R.
    """
    if n < 0 or resolution < 1:
        raise ValueError(f"need n >= 0 and resolution >= 1, got n={n}, resolution={resolution}")
    g = torch.Generator().manual_seed(int(seed))
    params = sample_shape_params(n, g)
    with torch.no_grad():
        images = [render_shapes(params[i:i + chunk], resolution) for i in range(0, n, chunk)]
    images = torch.cat(images) if images else torch.zeros(0, 3, resolution, resolution)
    return images, params


class ShapesDataset(ImageDataset):
    """``make_shapes`` as a dataset; ``.params`` [n, 14]; label: Tensor[0], or one-hot kind [3]
    when ``conditional=True``. Images are held as float32 (exactly ``render_shapes(params)``)."""

    def __init__(self, n: int = 10000, resolution: int = 16, seed: int = 0, conditional: bool = False):
        self.name = "shapes"
        self.images, self.params = make_shapes(n, resolution, seed)
        self.class_index = self.params[:, :3].argmax(1)
        self.labels = self.params[:, :3].clone() if conditional else torch.zeros(n, 0)
        self._resolution, self._num_channels = int(resolution), 3
        self.seed = seed

    def _image(self, i: int) -> Tensor:
        return self.images[i].clone()

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.images.clone(), self.labels.clone()


# ----------------------------------------------------------------------------------------------
# Built-in data (b): a flat 2-D disk embedded in R^D (the paper's synthetic tangent study).

@dataclass
class DiskData:
    """Points uniform (in area) on the disk ``{offset + basis @ a : ||a|| <= radius}`` in R^D.

    Attributes:
        points: float32 [n, D] samples.
        basis: float32 [D, 2], orthonormal columns spanning the tangent plane.
        offset: float32 [D], the disk's centre.
        radius: disk radius.

    Vectors ``v`` may be [n, D] or any [n, ...] that flattens to D (e.g. images [n, D, 1, 1]);
    projections return the input's shape.
    """

    points: Tensor
    basis: Tensor
    offset: Tensor
    radius: float

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def _flat(self, v: Tensor) -> Tensor:
        flat = v.reshape(v.shape[0], -1) if v.ndim > 1 else v[None]
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {tuple(v.shape)}")
        return flat

    def tangent_projection(self, v: Tensor) -> Tensor:
        """P_T v = B B^T v: the component of v parallel to the disk (the manifold's tangent space)."""
        B = self.basis.to(v)
        return ((self._flat(v) @ B) @ B.T).reshape(v.shape)

    def normal_projection(self, v: Tensor) -> Tensor:
        """(I - B B^T) v: the component of v normal to the disk's plane."""
        return v - self.tangent_projection(v)

    def coordinates(self, x: Tensor) -> Tensor:
        """In-plane coordinates a = B^T (x - offset): [n, 2]."""
        return (self._flat(x) - self.offset.to(x)) @ self.basis.to(x)

    def project(self, x: Tensor) -> Tensor:
        """Nearest point on the (closed) disk, same shape as x."""
        a = self.coordinates(x)
        norm = a.norm(dim=1, keepdim=True)
        a = a * (self.radius / norm.clamp_min(self.radius))  # shrink points outside the radius
        return (self.offset.to(x) + a @ self.basis.to(x).T).reshape(x.shape)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        """Euclidean distance to the disk: sqrt(||normal part||^2 + max(||a|| - radius, 0)^2), [n]."""
        y = self._flat(x) - self.offset.to(x)
        a = y @ self.basis.to(x)
        normal = y - a @ self.basis.to(x).T
        excess = (a.norm(dim=1) - self.radius).clamp_min(0)
        return (normal.pow(2).sum(1) + excess.pow(2)).sqrt()

    def as_images(self) -> Tensor:
        """points viewed as images [n, D, 1, 1] (D channels, 1x1 pixels) for image networks."""
        return self.points[:, :, None, None]


def make_disk(n: int, dim: int = 16, radius: float = 1.0, seed: int = 0,
              offset: Tensor | float | None = None) -> DiskData:
    """Sample a flat 2-D disk embedded in R^dim.

    The frame is the Q factor of a seeded Gaussian [dim, 2] matrix (signs fixed so diag(R) > 0);
    points are ``offset + basis @ (rho cos phi, rho sin phi)`` with ``rho = radius sqrt(U)``,
    ``phi = 2 pi U'`` (uniform in area). ``offset``: None/0 (centred at the origin), a [dim]
    tensor, or a float s (a seeded random Gaussian direction scaled to norm s). With radius <= 1 and
    no offset every coordinate lies in [-1, 1], like image pixels.
    """
    if dim < 2 or n < 0 or radius <= 0:
        raise ValueError(f"need dim >= 2, n >= 0, radius > 0; got dim={dim}, n={n}, radius={radius}")
    g = torch.Generator().manual_seed(int(seed))
    gauss = torch.randn(dim, 2, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))[None]
    basis = q.to(torch.float32)
    rho = radius * torch.rand(n, generator=g, dtype=torch.float64).sqrt()
    phi = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    coords = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi)], 1)
    if offset is None:
        off = torch.zeros(dim, dtype=torch.float64)
    elif isinstance(offset, Tensor):
        if offset.shape != (dim,):
            raise ValueError(f"offset must have shape [{dim}], got {tuple(offset.shape)}")
        off = offset.to(torch.float64)
    else:
        direction = torch.randn(dim, generator=g, dtype=torch.float64)
        off = float(offset) * direction / direction.norm()
    points = off + coords @ q.T
    return DiskData(points=points.to(torch.float32), basis=basis, offset=off.to(torch.float32),
                    radius=float(radius))


class DiskDataset(ImageDataset):
    """``make_disk`` points as images [D, 1, 1] (resolution 1, D channels), unconditional."""

    def __init__(self, n: int = 10000, dim: int = 16, radius: float = 1.0, seed: int = 0,
                 offset: Tensor | float | None = None):
        self.name = "disk"
        self.data = make_disk(n, dim, radius, seed, offset)
        self.labels = torch.zeros(n, 0)
        self._resolution, self._num_channels = 1, int(dim)

    def _image(self, i: int) -> Tensor:
        return self.data.points[i, :, None, None].clone()

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.data.as_images().clone(), self.labels.clone()


# ----------------------------------------------------------------------------------------------
# Built-in data (c): random crops of real photographs shipped inside scikit-image.

@dataclass(frozen=True)
class PhotoSource:
    """One photograph of ``skimage.data`` (loaded offline: the file ships inside the package)."""

    name: str        # the skimage.data function
    grayscale: bool  # replicated to RGB
    source: str
    licence: str


# The photographs: every real photograph that scikit-image 0.26 ships inside the wheel whose docstring
# states a licence or the absence of copyright restrictions, at least 172 px on its short side.
# Left out: stereo_motorcycle (Middlebury 2014; no licence stated), moon and page (no licence stated),
# cell (a phase image reconstructed from a hologram, not a photograph), microaneurysms (102 px),
# cat (the same photograph as chelsea), and the synthetic or binary images (colorwheel, checkerboard,
# logo, binary_blobs, horse, shepp_logan_phantom). eagle, lily, kidney and skin need a download.
# Grayscale photographs are replicated to the three RGB channels. The label of a crop is the index of
# its photograph in this tuple.
PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", False, "NASA Great Images (Eileen Collins)", "public domain"),
    PhotoSource("coffee", False, "Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
    PhotoSource("chelsea", False, "Stefan van der Walt (Chelsea the cat)", "CC0"),
    PhotoSource("rocket", False, "SpaceX (DSCOVR launch on Falcon 9)", "public domain"),
    PhotoSource("hubble_deep_field", False, "NASA / HubbleSite (Hubble eXtreme Deep Field)", "public domain"),
    PhotoSource("immunohistochemistry", False, "Center for Microscopy And Molecular Imaging (IHC staining)",
                "no known copyright restrictions"),
    PhotoSource("retina", False, "Mikael Haggstrom, Wikimedia Commons (fundus photograph)", "CC0"),
    PhotoSource("camera", True, "Lav Varshney (cameraman)", "CC0"),
    PhotoSource("coins", True, "Brooklyn Museum Collection (Greek coins from Pompeii)",
                "no known copyright restrictions"),
    PhotoSource("clock", True, "Stefan van der Walt (motion-blurred clock)", "public domain"),
    PhotoSource("text", True, "Wikipedia, File:Corner.png (handwritten text)", "public domain"),
    PhotoSource("grass", True, "linolafett, DeviantArt (Grass 01)", "CC0"),
    PhotoSource("gravel", True, "CC0Textures (Gravel04)", "CC0"),
    PhotoSource("brick", True, "CC0Textures (Bricks25)", "CC0"),
)
PHOTO_NAMES: tuple[str, ...] = tuple(p.name for p in PHOTO_SOURCES)
# Default shrink factor: the photographs are 172-1411 px on their short side; shrunk 4x (43-353 px) a
# 16 px crop covers 5-37% of a photograph's short side (an eye of the cat, a coin, a few letters), a
# recognisable patch, while at full size most 16 px crops are a few percent of the photo: flat colour.
PHOTO_DOWNSCALE = 4.0
# Held-out split: the last 20% of each photograph along its longer side (at least one crop wide).
PHOTO_TEST_FRACTION = 0.2
PHOTO_SPLITS = ("train", "test")
_PHOTO_FORMAT = 1  # bump when the crop procedure changes (part of the cache key)


def _photo_version() -> str:
    try:
        import skimage
    except ImportError as exc:
        raise ImportError("data.name=photos needs scikit-image (pip install scikit-image; it is a dependency "
                          "of this package)") from exc
    return skimage.__version__


@functools.lru_cache(maxsize=4)
def load_photos(downscale: float = PHOTO_DOWNSCALE) -> tuple[Tensor, ...]:
    """The photographs of ``PHOTO_SOURCES`` as uint8 [3, H, W] tensors, shrunk by ``downscale`` with
    antialiasing (``_resize_uint8``; size ``round(H / downscale) x round(W / downscale)``).
    Read from the files inside scikit-image (no download); cached per process."""
    _photo_version()
    import skimage.data
    if not downscale >= 1:
        raise ValueError(f"data.photo_downscale={downscale} must be >= 1")
    out = []
    for src in PHOTO_SOURCES:
        arr = np.asarray(getattr(skimage.data, src.name)(), dtype=np.uint8)
        x = torch.from_numpy(arr.copy())
        x = x[None].expand(3, -1, -1) if arr.ndim == 2 else x.permute(2, 0, 1)[:3]
        if downscale != 1:
            h, w = x.shape[-2:]
            x = _resize_uint8(x[None], (max(1, round(h / downscale)), max(1, round(w / downscale))))[0]
        out.append(x.contiguous())
    return tuple(out)


def photo_regions(height: int, width: int, resolution: int, split: str) -> tuple[int, int, int]:
    """The spatial partition of one (shrunk) photograph: ``(axis, lo, hi)``.

    The split runs across the longer side (``axis`` 1: columns, if width >= height, else 0: rows) of
    length L: the held-out strip is ``[L - t, L)`` with ``t = max(ceil(PHOTO_TEST_FRACTION * L), R)``, the
    training region ``[0, L - t)``. A crop of ``split`` starts at an offset in ``[lo, hi]`` along ``axis``,
    so every crop lies inside its region and no training crop overlaps a held-out crop.
    """
    axis = 1 if width >= height else 0
    L, S = (width, height) if axis == 1 else (height, width)
    t = max(math.ceil(PHOTO_TEST_FRACTION * L), resolution)
    if S < resolution or L - t < resolution:
        raise ValueError(f"{height}x{width} is too small for {resolution} px crops in both splits")
    return (axis, 0, L - t - resolution) if split == "train" else (axis, L - t, L - resolution)


def photo_cache_key(split: str, resolution: int, downscale: float, n: int, seed: int) -> str:
    """File stem of a cached crop set: readable parameters + a hash of everything else that defines it."""
    extra = json.dumps({"sources": PHOTO_NAMES, "test_fraction": PHOTO_TEST_FRACTION, "format": _PHOTO_FORMAT,
                        "skimage": _photo_version()}, sort_keys=True)
    digest = hashlib.sha1(extra.encode()).hexdigest()[:8]
    return f"photos-{split}-{resolution}px-down{downscale:g}-n{n}-seed{seed}-{digest}"


def make_photo_crops(n: int, resolution: int = 16, downscale: float = PHOTO_DOWNSCALE, seed: int = 0,
                     split: str = "train") -> tuple[Tensor, Tensor, Tensor]:
    """Random square crops of the photographs: (images uint8 [n, 3, R, R], labels int64 [n] (photo
    index in PHOTO_SOURCES), boxes int64 [n, 4] = (top, left, height, width) in the shrunk photo).

    Classes are balanced (``n // len(PHOTO_SOURCES)`` crops per photo, one more for the first
    ``n % len(PHOTO_SOURCES)``); positions are uniform over the split's region (``photo_regions``);
    the order is shuffled. Deterministic from ``seed`` (a local generator; the test split draws from
    its own stream, seeded ``seed + 2**31``).
    """
    if split not in PHOTO_SPLITS:
        raise ValueError(f"data.split={split!r}: expected one of {', '.join(PHOTO_SPLITS)}")
    if n < 1 or resolution < 8:
        raise ValueError(f"photos need num_images >= 1 and resolution >= 8, got {n}, {resolution}")
    photos = load_photos(float(downscale))
    g = torch.Generator().manual_seed(int(seed) + (2 ** 31 if split == "test" else 0))
    S = len(photos)
    counts = [n // S + (k < n % S) for k in range(S)]
    images, labels, boxes = [], [], []
    r = torch.arange(resolution)
    too_small = []
    for k, photo in enumerate(photos):
        try:
            photo_regions(photo.shape[1], photo.shape[2], resolution, split)
        except ValueError:
            too_small.append(f"{PHOTO_SOURCES[k].name} is {photo.shape[1]}x{photo.shape[2]}")
    if too_small:  # the largest factor at which every photograph has room for a crop in both regions
        most = min(downscale * min(min(p.shape[1:]) / resolution, max(p.shape[1:]) / (2 * resolution)) for p in photos)
        raise ValueError(
            f"photos: {len(too_small)} of {len(photos)} photographs are too small for {resolution} px crops in both "
            f"splits after data.photo_downscale={downscale:g} ({', '.join(too_small)}); lower data.photo_downscale "
            f"(to at most about {math.floor(most * 10) / 10:g}) or data.resolution")
    for k, (photo, m) in enumerate(zip(photos, counts)):
        h, w = photo.shape[-2:]
        axis, lo, hi = photo_regions(h, w, resolution, split)
        along = lo + torch.randint(0, hi - lo + 1, (m,), generator=g)
        across = torch.randint(0, (w if axis == 0 else h) - resolution + 1, (m,), generator=g)
        top, left = (across, along) if axis == 1 else (along, across)
        rows, cols = top[:, None] + r, left[:, None] + r  # [m, R]
        images.append(photo[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3))  # [m, 3, R, R]
        labels.append(torch.full((m,), k, dtype=torch.int64))
        boxes.append(torch.stack([top, left, torch.full_like(top, resolution), torch.full_like(top, resolution)], 1))
    order = torch.randperm(n, generator=g)
    return torch.cat(images)[order].contiguous(), torch.cat(labels)[order], torch.cat(boxes)[order]


def _atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PhotoCropsDataset(InMemoryImageDataset):
    """Crops of real photographs (``make_photo_crops``), labelled with their photograph, cached on disk.

    The photographs ship inside scikit-image (``PHOTO_SOURCES``; sources and licences there and in the
    README): astronaut (NASA, public domain), coffee (CC0), chelsea (CC0), rocket (SpaceX, public domain),
    hubble_deep_field (NASA, public domain), immunohistochemistry (CMMI, no known copyright restrictions),
    retina (Wikimedia Commons, CC0), camera (CC0), coins (Brooklyn Museum, no known copyright
    restrictions), clock (public domain), text (Wikipedia, public domain), grass, gravel, brick (CC0).

    Args:
        root: data root; the crops are cached in ``<root>/photos/<photo_cache_key(...)>.pt`` (default root
            ``default_data_root()``), rebuilt when missing or unreadable.
        split: 'train' (crops inside the first 80% of each photo along its longer side) or 'test' (the
            held-out strip: no test crop overlaps a training crop).
        resolution: crop size R (a power of two >= 8).
        n: number of crops; seed: generator seed; downscale: shrink factor applied before cropping.
        conditional: labels one-hot [len(PHOTO_SOURCES)] instead of Tensor[0].
    Attributes: ``boxes`` int64 [n, 4] (top, left, height, width in the shrunk photo), ``class_names``.
    """

    def __init__(self, root: str | None = None, split: str = "train", resolution: int = 16, n: int = 50000,
                 seed: int = 0, downscale: float = PHOTO_DOWNSCALE, conditional: bool = False):
        root = default_data_root() if root is None else str(root)
        key = photo_cache_key(split, int(resolution), float(downscale), int(n), int(seed))
        path = os.path.join(root, "photos", key + ".pt")
        blob = None
        if os.path.isfile(path):
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("key") != key:
                    raise ValueError(f"key {blob.get('key')!r} != {key!r}")
            except Exception as exc:  # truncated / foreign file: rebuild it
                print(f"[data] {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it", flush=True)
                blob = None
        if blob is None:
            images, labels, boxes = make_photo_crops(int(n), int(resolution), float(downscale), int(seed), split)
            blob = {"key": key, "images": images, "labels": labels, "boxes": boxes}
            _atomic_torch_save(blob, path)
        super().__init__(blob["images"], blob["labels"], conditional=conditional, num_classes=len(PHOTO_SOURCES),
                         name=f"photos-{split}")
        self.boxes, self.split, self.cache_path = blob["boxes"], split, path
        self.class_names = list(PHOTO_NAMES)


# ----------------------------------------------------------------------------------------------
# Helpers and registry.

def as_tensors(ds: torch.utils.data.Dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack a (small) dataset: (images float32 [N, C, H, W], labels float32 [N, label_dim]).

    Uses the dataset's own ``tensors()`` when available (one conversion, no per-item loop);
    ``limit`` keeps the first ``limit`` items.
    """
    n = len(ds) if limit is None else min(int(limit), len(ds))
    if isinstance(ds, ImageDataset):
        if n == len(ds):
            return ds.tensors()
        if isinstance(ds, InMemoryImageDataset):
            return _uint8_to_float(ds.images[:n]), ds.labels[:n].clone()
    items = [ds[i] for i in range(n)]
    if not items:
        raise ValueError("as_tensors: empty dataset (cannot infer shapes)")
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _no_download(name: str, download: bool) -> None:
    if download:
        raise ValueError(f"dataset {name!r} is read from local files; download=True is not supported")


def _train_only(name: str, kw: dict) -> dict:
    """Datasets without a held-out split accept split='train' only."""
    split = kw.pop("split", "train")
    if split != "train":
        raise ValueError(f"data.split={split!r}: dataset {name!r} has no held-out split (only "
                         f"cifar10, mnist, fashion-mnist and photos have a test split)")
    return kw


def _get_cifar10(root, resolution, download, conditional, **kw):
    return CIFAR10Dataset(root, resolution=resolution, download=download, conditional=conditional, **kw)


def _get_mnist(variant: str):
    def make(root, resolution, download, conditional, resize: bool = False, **kw):
        if resize:
            kw["mnist_mode"] = "resize"
        return MNISTDataset(root, variant=variant, resolution=resolution, download=download,
                            conditional=conditional, **kw)
    return make


def _get_folder(root, resolution, download, conditional, **kw):
    _no_download("folder", download)
    if root is None:
        raise ValueError("dataset 'folder' needs root=<directory of images> (data.root=DIR)")
    return ImageFolderDataset(root, resolution=resolution, conditional=conditional, **_train_only("folder", kw))


def _get_zip(root, resolution, download, conditional, **kw):
    _no_download("zip", download)
    if root is None:
        raise ValueError("dataset 'zip' needs root=<path to the .zip archive> (data.root=FILE.zip)")
    return ImageZipDataset(root, resolution=resolution, conditional=conditional, **_train_only("zip", kw))


def _get_shapes(root, resolution, download, conditional, **kw):
    return ShapesDataset(resolution=16 if resolution is None else int(resolution), conditional=conditional,
                         **_train_only("shapes", kw))


def _get_disk(root, resolution, download, conditional, **kw):
    if resolution not in (None, 1):
        raise ValueError(f"dataset 'disk' has resolution 1 (points as [D, 1, 1] images), got {resolution}")
    if conditional:
        raise ValueError("dataset 'disk' has no labels; conditional=True is not supported")
    return DiskDataset(**_train_only("disk", kw))


def _get_photos(root, resolution, download, conditional, **kw):
    return PhotoCropsDataset(root, resolution=16 if resolution is None else int(resolution),
                             conditional=conditional, **kw)


_REGISTRY: dict[str, Callable[..., ImageDataset]] = {
    "cifar10": _get_cifar10,
    "mnist": _get_mnist("mnist"),
    "fashion-mnist": _get_mnist("fashion-mnist"),
    "folder": _get_folder,
    "zip": _get_zip,
    "shapes": _get_shapes,
    "disk": _get_disk,
    "photos": _get_photos,
}
DATASET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
SPLIT_DATASETS: tuple[str, ...] = ("cifar10", "mnist", "fashion-mnist", "photos")  # have a held-out test split


def dataset_kwargs(d) -> dict:
    """``get_dataset`` keyword arguments from a data configuration (``ayt.config.DataConfig`` or any object
    with its attributes): name, root, resolution, download, conditional, plus the settings that apply to
    that dataset (split, labels, resize, skip_unreadable, num_images, seed, photo_downscale)."""
    kw = dict(name=d.name, root=d.root, resolution=d.resolution, download=d.download, conditional=d.conditional)
    if d.name in ("shapes", "disk"):
        kw.update(n=d.num_images, seed=d.seed)
    elif d.name == "photos":
        kw.update(n=d.num_images, seed=d.seed, downscale=d.photo_downscale)
    elif d.name in ("folder", "zip"):
        kw.update(labels=d.labels, resize=d.resize, skip_unreadable=d.skip_unreadable)
    elif d.name in ("cifar10", "mnist", "fashion-mnist"):
        kw.update(resize=d.resize)
    if d.split != "train" or d.name in SPLIT_DATASETS:
        kw.update(split=d.split)
    return kw


def get_dataset(name: str, root: str | None = None, resolution: int | None = None, download: bool = False,
                conditional: bool = False, **kw) -> ImageDataset:
    """Build a dataset by name.

    Args:
        name: one of ``DATASET_NAMES``: 'cifar10', 'mnist', 'fashion-mnist' (``root`` = data root,
            default ``default_data_root()``), 'folder' / 'zip' (``root`` = the directory / archive),
            'shapes', 'disk' (built in; ``root`` and ``download`` ignored), 'photos' (built in from
            scikit-image's photographs; ``root`` = where the crops are cached).
        resolution: expected/output resolution (None: the dataset's native one).
        download: fetch CIFAR-10 / (Fashion-)MNIST when missing.
        conditional: labels one-hot (label_dim > 0) instead of Tensor[0].
        **kw: passed to the dataset class (e.g. ``split``, ``mnist_mode``, ``rgb``, ``resize``,
            ``labels``, ``skip_unreadable``, ``n``, ``seed``, ``dim``, ``downscale``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _REGISTRY[name](root, resolution, download, conditional, **kw)
