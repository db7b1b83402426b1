"""Cheap sample-quality numbers for digit models: label agreement and a classifier Frechet distance.

A small CNN is trained once on MNIST (about a minute on 2 CPU cores, ~99% test accuracy) and
cached under `~/.cache/routefx/`. `label_agreement` is the fraction of class-conditional samples
it classifies as the class they were asked for; `frechet_distance` is the Frechet distance
between Gaussians fitted to its 128-d penultimate features. This is NOT Inception FID: the numbers
only compare runs on digits with each other (500 real test digits against 500 other real ones
score ~25 from finite-sample bias; pure noise hundreds).

Example:
    >>> from routefx.data import load_images
    >>> test = load_images("mnist", split="test")                        # doctest: +SKIP
    >>> label_agreement(test.images[:500], test.labels[:500]) > 0.97     # doctest: +SKIP
    True
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitClassifier", "classifier", "features", "label_agreement", "frechet_distance",
           "cache_dir"]

_VERSION = 2


class DigitClassifier(nn.Module):
    """Three conv layers and a 128-d feature layer; input (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),                   # (B, 64, 7, 7)
        )
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(64 * 49, 128))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, 10))

    def features(self, x):
        return self.feature(self.convs(x))  # (B, 128), before the ReLU (no dead dimensions)

    def forward(self, x):
        return self.head(self.features(x))  # (B, 10)


def cache_dir() -> str:
    """`$ROUTEFX_CACHE` or `~/.cache/routefx`."""
    return os.environ.get("ROUTEFX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "routefx")


def _train(epochs: int = 2, seed: int = 0) -> DigitClassifier:
    from .data import load_images
    data = load_images("mnist", split="train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(data) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=g)
        for i in range(len(data) // 128):
            ids = order[i * 128:(i + 1) * 128]
            x = _augment(data.images[ids], g)
            loss = F.cross_entropy(model(x), data.labels[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _augment(x, g):
    """Small random shifts (+-2 px) so slightly off-centre samples are still read."""
    dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


_CACHE = {}


def classifier(retrain: bool = False) -> DigitClassifier:
    """The MNIST classifier, trained on first use and cached on disk (and in memory)."""
    path = os.path.join(cache_dir(), f"mnist_classifier_v{_VERSION}.pt")
    if path in _CACHE and not retrain:
        return _CACHE[path]
    model = DigitClassifier()
    if os.path.exists(path) and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    else:
        print(f"[routefx.evaluate] training the MNIST classifier once (cached at {path}) ...", flush=True)
        model = _train()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    _CACHE[path] = model.eval()
    return _CACHE[path]


def _prep(images: torch.Tensor) -> torch.Tensor:
    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def _batched(fn, images, batch=500):
    return torch.cat([fn(_prep(images[i:i + batch])) for i in range(0, len(images), batch)])


def features(images: torch.Tensor) -> torch.Tensor:
    """(N, 128) classifier features of (N, 1 or 3, H, W) images in [-1, 1] (resized to 28x28)."""
    return _batched(classifier().features, images)


def label_agreement(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `samples` that the MNIST classifier assigns to the `labels` they were drawn for."""
    pred = _batched(classifier(), samples).argmax(dim=1)
    return (pred == labels.cpu()).float().mean().item()


def frechet_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between Gaussians of classifier features (NOT Inception FID)."""
    from scipy import linalg
    a, b = features(samples).double().numpy(), features(reference).double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
