"""DiM-style diffusion Mamba (Teng et al., "DiM: Diffusion Mamba") built from mamba-ssm's modules.

Image -> patch tokens -> a stack of mamba-ssm `Block`s (Add -> LayerNorm -> `Mamba`) -> patches.
The condition enters as two tokens, [class, time], put in front of the patch tokens (as in U-ViT):
`Block` norms its input with a plain `norm_cls(dim)`, which leaves no hook for adaLN modulation,
and a causal scan that starts with the condition lets every patch token read it. The two
condition tokens are dropped before the head. Unlike the paper, every layer scans the same
direction (no scan-direction switching, no padding tokens).

Runs on CPU through `routefx.mamba_compat.load_mamba()`, called at import.

Example:
    >>> from routefx.backbones.mamba import build_model, example_inputs
    >>> model = build_model("DiM-T/2")
    >>> model(*example_inputs(model)).shape
    torch.Size([2, 4, 8, 8])
"""
import math
from functools import partial

import torch
from torch import nn

from routefx.mamba_compat import load_mamba

_ssm = load_mamba()
Mamba, Block = _ssm.mamba_simple.Mamba, _ssm.block.Block

__all__ = ["DiM", "Mamba_models", "build_model", "example_inputs",
           "DiM_T_2", "DiM_S_2", "DiM_B_2"]


#################################################################################
#                          Embedding layers for t and y                         #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar diffusion timesteps into vectors (sinusoids + MLP, as DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoids(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, freq_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoids(t, self.freq_dim))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; label `num_classes` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)  # (N, D)


#################################################################################
#                                 Core DiM model                                #
#################################################################################

class DiM(nn.Module):
    """Diffusion model with a Mamba backbone and [class, time] condition tokens."""

    def __init__(self, img_size=32, patch_size=2, in_channels=4, out_channels=None, dim=384,
                 depth=12, d_state=16, d_conv=4, expand=2, num_classes=1000,
                 residual_in_fp32=True):
        super().__init__()
        self.img_size, self.patch_size, self.num_classes = img_size, patch_size, num_classes
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.extras = 2  # condition tokens [class, time] in front of the patches
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim)
        mixer = partial(Mamba, d_state=d_state, d_conv=d_conv, expand=expand)
        self.layers = nn.ModuleList([
            Block(dim, mixer_cls=partial(mixer, layer_idx=i), mlp_cls=nn.Identity,
                  norm_cls=nn.LayerNorm, fused_add_norm=False, residual_in_fp32=residual_in_fp32)
            for i in range(depth)])
        self.norm_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Mamba layers keep mamba-ssm's own initialisation (dt_proj bias, A_log, D).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def embed(self, x, t, y):
        """Condition tokens followed by patch tokens, `(N, 2 + T, D)`."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        x = x + self.pos_embed  # (N, T, D)
        cond = torch.stack([self.y_embedder(y), self.t_embedder(t)], dim=1)  # (N, 2, D)
        return torch.cat([cond, x], dim=1)  # (N, 2 + T, D)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: (N, C, H, W) noisy latents, t: (N,) timesteps, y: (N,) labels -> (N, C_out, H, W)."""
        hidden = self.embed(x, t, y)  # (N, 2 + T, D)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)  # (N, 2 + T, D) each
        residual = hidden + residual
        hidden = self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))  # (N, 2 + T, D)
        hidden = self.head(hidden[:, self.extras:])  # (N, T, p*p*C_out)
        return self.unpatchify(hidden)  # (N, C_out, H, W)


#################################################################################
#                                  DiM configs                                  #
#################################################################################

def DiM_T_2(**kwargs):
    """Tiny test and demo size; not from the paper."""
    return DiM(**{"img_size": 8, "dim": 64, "depth": 6, "d_state": 8, "num_classes": 10,
                  **kwargs})


def DiM_S_2(**kwargs):
    return DiM(**{"img_size": 32, "patch_size": 2, "dim": 384, "depth": 12, **kwargs})


def DiM_B_2(**kwargs):
    return DiM(**{"img_size": 32, "patch_size": 2, "dim": 768, "depth": 24, **kwargs})


Mamba_models = {"DiM-T/2": DiM_T_2, "DiM-S/2": DiM_S_2, "DiM-B/2": DiM_B_2}


def build_model(name: str = "DiM-T/2", **kwargs) -> DiM:
    """Build a DiM by size name.

    Args:
        name: a key of `Mamba_models` ("DiM-T/2", "DiM-S/2", "DiM-B/2").
        **kwargs: overrides passed to `DiM`.

    Returns:
        The model, in training mode.

    Example:
        >>> model = build_model("DiM-T/2")
        >>> len(model.layers)
        6
    """
    if name not in Mamba_models:
        raise ValueError(f"unknown DiM size {name!r}; valid names: {sorted(Mamba_models)}")
    return Mamba_models[name](**kwargs)


def example_inputs(model: DiM, batch: int = 2):
    """Random `(x, t, y)` that fit `model`, on its device.

    Args:
        model: a `DiM`.
        batch: batch size.

    Returns:
        `x` `(batch, C, H, W)`, `t` `(batch,)` timesteps in [0, 1000), `y` `(batch,)` labels.

    Example:
        >>> x, t, y = example_inputs(build_model("DiM-T/2"), batch=3)
        >>> tuple(x.shape), tuple(t.shape), tuple(y.shape)
        ((3, 4, 8, 8), (3,), (3,))
    """
    device, size = model.pos_embed.device, model.img_size
    x = torch.randn(batch, model.in_channels, size, size, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    return x, t, y
