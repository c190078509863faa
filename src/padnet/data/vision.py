"""Offline image datasets: Fashion-MNIST (idx files), CIFAR-10 (binary or python release), ImageFolder.

Images come back as uint8 tensors in numpy layout (``[H, W]`` or ``[H, W, C]``);
``transforms.ToFloat`` turns them into float ``[C, H, W]``. Labels are ints.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from padnet.data.errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FashionMNIST",
    "CIFAR10",
    "ImageFolder",
    "read_idx",
]

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Transform = Callable[[Tensor], Tensor]

# idx type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------- idx


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DatasetFormatError(f"{path}: cannot read file (corrupt or truncated gzip?): {e}") from e


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Parse an idx file (``.gz`` or raw) into a numpy array in native byte order.

    Checks the magic number, the expected ``ndim`` if given, and that the
    payload size matches the header; raises :class:`DatasetFormatError` naming
    the file otherwise.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: file too short for an idx header ({len(raw)} bytes)")
    zero, code, nd = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: bad idx magic number 0x{raw[:4].hex()}")
    if ndim is not None and nd != ndim:
        raise DatasetFormatError(f"{path}: expected an idx file with {ndim} dims, header says {nd}")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: idx payload is {len(raw) - header} bytes, header shape {shape} needs {expected} "
            "(truncated or corrupt file)"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# ------------------------------------------------------------------ Fashion-MNIST


class FashionMNIST(Dataset):
    """Fashion-MNIST from local idx files, held in memory.

    ``data`` is uint8 ``[N, 28, 28]``, ``targets`` int64 ``[N]``; an item is
    ``(image [28, 28] uint8 or transform(image), label int)``. ``root`` may be
    the directory with the idx files (``.gz`` or uncompressed) or a parent
    holding ``fashion-mnist/`` or ``FashionMNIST/raw/``.
    """

    classes = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]

    def __init__(self, root: str | Path | None = None, train: bool = True, transform: Transform | None = None) -> None:
        self.root = Path(root) if root is not None else DEFAULT_FASHION_MNIST_ROOT
        self.train = train
        self.transform = transform
        prefix = "train" if train else "t10k"
        images_path = self._find(f"{prefix}-images-idx3-ubyte")
        labels_path = self._find(f"{prefix}-labels-idx1-ubyte")
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DatasetFormatError(f"{images_path} / {labels_path}: expected unsigned-byte idx files")
        if images.shape[0] != labels.shape[0]:
            raise DatasetFormatError(
                f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
            )
        if labels.size and labels.max() >= len(self.classes):
            raise DatasetFormatError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
        self.data = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def _find(self, stem: str) -> Path:
        dirs = [self.root, self.root / "fashion-mnist", self.root / "FashionMNIST" / "raw"]
        names = [f"{stem}.gz", stem, stem.replace("-idx", ".idx")]
        for d in dirs:
            for n in names:
                if (d / n).is_file():
                    return d / n
        raise DatasetNotFoundError(
            f"Fashion-MNIST file {stem}[.gz] not found under {self.root}. "
            "Install it with `apt-get install dataset-fashion-mnist` (files land in "
            f"{DEFAULT_FASHION_MNIST_ROOT}) or pass the directory holding the idx files "
            "as root / --data-dir."
        )

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self.data[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"FashionMNIST(split={split}, size={len(self)}, root={str(self.root)!r})"


# ----------------------------------------------------------------------- CIFAR-10

_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# The python release stores each batch as a pickle. Unpickling runs whatever the file names, so
# these files are read with a restricted unpickler that resolves only the few globals numpy
# needs to rebuild a plain array; anything else (os.system, builtins.eval, ...) is refused
# before it can run. The binary release (``cifar-10-batches-bin``) needs no pickle at all.
_CIFAR_MAX_FILE_BYTES = 256 * 2**20  # a real batch is ~30 MB


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` limited to an empty ``ndarray`` (its state then sets the data)."""
    if subtype is not np.ndarray or int(np.prod(shape, dtype=np.int64)) > 1:
        raise pickle.UnpicklingError(f"refused array reconstruction of {subtype!r} with shape {shape!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_frombuffer(buf, dtype, shape, order):
    """numpy's ``_frombuffer`` (protocol 5 arrays): a view of bytes already in the file."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused an object array")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _safe_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as used by protocol-2 pickles for bytes (latin-1 only)."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1", errors)


def _safe_dtype(*args):
    dtype = np.dtype(*args[:1])
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused an object dtype")
    return dtype


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits dicts, lists, strings, numbers and plain numpy arrays, nothing else."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name} (only numpy arrays, "
                                         "dicts, lists and strings are allowed in a CIFAR batch)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def _plain(obj, depth: int = 0) -> bool:
    """True if ``obj`` is built only from dicts, lists/tuples, str/bytes, numbers and numeric arrays."""
    if depth > 4:
        return False
    if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return True
    if isinstance(obj, np.ndarray):
        return not obj.dtype.hasobject
    if isinstance(obj, (list, tuple)):
        return all(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, bytes)) and _plain(v, depth + 1) for k, v in obj.items())
    return False


def _unpickle(path: Path) -> dict:
    """Read one batch of the CIFAR python release without running code (restricted unpickler)."""
    size = path.stat().st_size
    if size > _CIFAR_MAX_FILE_BYTES:
        raise DatasetFormatError(f"{path}: {size:,} bytes is far larger than a CIFAR batch file")
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError) as e:
        raise DatasetFormatError(f"{path}: not a readable CIFAR python batch: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a dict pickle, got {type(obj).__name__}")
    if not _plain(obj):
        raise DatasetFormatError(f"{path}: a CIFAR batch holds only arrays, lists and strings")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


CIFAR_BIN_RECORD = 1 + 3 * 32 * 32


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the binary release: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    raw = _read_bytes(path)
    if not raw or len(raw) % CIFAR_BIN_RECORD:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes is not a whole number of {CIFAR_BIN_RECORD}-byte "
                                 "CIFAR-10 records (truncated or not the binary release)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_BIN_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DatasetFormatError(f"{path}: label {int(labels.max())} out of range 0..9 (not CIFAR-10 binary data)")
    return records[:, 1:].copy(), labels


class CIFAR10(Dataset):
    """CIFAR-10 from a local release, held in memory; nothing is ever unpickled freely.

    ``root`` is the extracted binary release (``cifar-10-batches-bin``: ``data_batch_1.bin`` ...
    ``test_batch.bin``, ``batches.meta.txt``), the python release (``cifar-10-batches-py``, read
    with a restricted unpickler that admits only dicts of arrays, lists and strings, so a crafted
    file cannot run code), or a parent of either. The binary release is preferred when both
    exist. ``data`` is uint8 ``[N, 32, 32, 3]``, ``targets`` int64 ``[N]``; an item is
    ``(image [32, 32, 3] uint8 or transform(image), label int)``.
    """

    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]

    def __init__(self, root: str | Path, train: bool = True, transform: Transform | None = None) -> None:
        self.root = Path(root)
        self.train = train
        self.transform = transform
        folder, binary = self._locate()
        images, labels = [], []
        for name in self.train_files if train else self.test_files:
            if binary:
                data, lab = _read_cifar_bin(folder / f"{name}.bin")
            else:
                batch = _unpickle(folder / name)
                if "data" not in batch or not ("labels" in batch or "fine_labels" in batch):
                    raise DatasetFormatError(f"{folder / name}: missing 'data'/'labels' entries")
                if not isinstance(batch["data"], np.ndarray) or batch["data"].dtype != np.uint8:
                    raise DatasetFormatError(f"{folder / name}: 'data' must be a uint8 array")
                data = batch["data"]
                try:
                    lab = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
                except (TypeError, ValueError) as e:
                    raise DatasetFormatError(f"{folder / name}: labels are not integers ({e})") from e
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.ndim != 1 or data.shape[0] != lab.shape[0]:
                raise DatasetFormatError(
                    f"{folder / name}: expected data [N, 3072] and N labels, got {data.shape} and {lab.shape}"
                )
            if lab.size and (lab.min() < 0 or lab.max() >= 10):
                raise DatasetFormatError(f"{folder / name}: labels must be in 0..9")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(lab)
        self.data = torch.from_numpy(np.ascontiguousarray(np.concatenate(images)))
        self.targets = torch.from_numpy(np.concatenate(labels))
        self.classes = list(_CIFAR10_CLASSES)
        names: list = []
        if binary and (folder / "batches.meta.txt").is_file():
            names = [ln.strip() for ln in (folder / "batches.meta.txt").read_text(errors="replace").splitlines()
                     if ln.strip()]
        elif not binary and (folder / "batches.meta").is_file():
            names = _unpickle(folder / "batches.meta").get("label_names") or []
        if names:
            if not isinstance(names, list) or len(names) != 10:
                raise DatasetFormatError(f"{folder}: batches.meta must list 10 class names")
            self.classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]

    def _locate(self) -> tuple[Path, bool]:
        """``(folder, is_binary_release)``."""
        needed = self.train_files + self.test_files
        for d in (self.root, self.root / "cifar-10-batches-bin"):
            if all((d / f"{n}.bin").is_file() for n in needed):
                return d, True
        for d in (self.root, self.root / "cifar-10-batches-py"):
            if all((d / n).is_file() for n in needed):
                return d, False
        raise DatasetNotFoundError(
            f"CIFAR-10 batches not found under {self.root} (looked for {', '.join(needed)} with and without "
            ".bin there and in cifar-10-batches-bin/ and cifar-10-batches-py/). Download cifar-10-binary.tar.gz "
            "or cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html on a machine with "
            "network access, extract it, and pass the extracted directory (or its parent) as root / --data-dir."
        )

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self.data[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"CIFAR10(split={split}, size={len(self)}, root={str(self.root)!r})"


# -------------------------------------------------------------------- ImageFolder


class ImageFolder(Dataset):
    """``root/<class>/**/<image>`` loaded lazily with Pillow as RGB.

    Classes are the sorted sub-directory names (``classes``, ``class_to_idx``);
    ``samples`` lists ``(path, label)``. An item is ``(image [H, W, 3] uint8 or
    transform(image), label int)``; ``image_size`` resizes every image to a
    square ``image_size x image_size`` (bilinear) so batches can be stacked.
    """

    extensions = IMAGE_EXTENSIONS

    def __init__(self, root: str | Path, transform: Transform | None = None, image_size: int | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.image_size = image_size
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"ImageFolder root {self.root} does not exist or is not a directory")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DatasetNotFoundError(
                f"ImageFolder root {self.root} has no class sub-directories; expected root/<class>/<image>"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for c in self.classes:
            files = sorted(self._images_in(self.root / c))
            if not files:
                empty.append(c)
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if empty:
            raise DatasetNotFoundError(
                f"ImageFolder {self.root}: no images with extensions {', '.join(self.extensions)} "
                f"in class folder(s): {', '.join(empty)}"
            )
        self.targets = [label for _, label in self.samples]

    def _images_in(self, folder: Path) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(self.extensions):
                    out.append(Path(dirpath) / name)
        return out

    def load(self, path: str | Path) -> Tensor:
        """Read one image as uint8 ``[H, W, 3]`` (resized if ``image_size`` is set)."""
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.image_size is not None:
                    im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                arr = np.array(im, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetFormatError(f"{path}: cannot read image: {e}") from e
        return torch.from_numpy(arr)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        img = self.load(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, classes={len(self.classes)}, size={len(self)})"
