"""Pictures of a training run: sample grids (PNG) and the loss curve (matplotlib, Agg).

Example:
    >>> import torch
    >>> save_grid(torch.zeros(20, 1, 8, 8), "/tmp/grid.png", rows=10)   # doctest: +SKIP
"""
import json
import os

import numpy as np
import torch

__all__ = ["save_grid", "plot_loss", "read_metrics"]


def save_grid(images: torch.Tensor, path: str, rows: int, pad: int = 2, scale: int = None) -> str:
    """Write (N, C, H, W) images in [-1, 1] as a `rows` x N/rows PNG grid (row r = images r*cols..)."""
    from PIL import Image
    n, c, h, w = images.shape
    cols = -(-n // rows)
    img = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, y0:y0 + h, x0:x0 + w] = img[i]
    arr = grid.permute(1, 2, 0).numpy()
    pic = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = scale or max(1, 224 // max(h, w) // 2)
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pic.save(path)
    return path


def read_metrics(path: str) -> list:
    """The records of a metrics JSONL file (skips a torn last line)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_loss(metrics_path: str, path: str, title: str = "") -> str:
    """Plot loss against step (raw and smoothed) from a metrics JSONL file into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    if len(loss) > 5:
        k = max(2, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
