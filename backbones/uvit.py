"""U-ViT: a ViT that treats time, condition and patches all as tokens, with long skips.

Follows Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models" (CVPR 2023).
The sequence is ``[label, time, patches]``; the first half of the blocks hand their outputs
to the second half through long skip connections, each merged by a linear layer.

Example:
    >>> from routefx.backbones.uvit import build_model, example_inputs
    >>> model = build_model("U-ViT-T/2")
    >>> model(*example_inputs(model)).shape
    torch.Size([2, 4, 16, 16])
"""

import math

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

__all__ = [
    "UViT", "Block", "Attention", "PatchEmbed", "timestep_embedding", "unpatchify",
    "UViT_models", "UViT_S_2", "UViT_M_2", "UViT_T_2", "build_model", "example_inputs",
]


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of a (B,) tensor of timesteps: (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def unpatchify(x, channels):
    """(B, L, p * p * C) patch tokens back to (B, C, H, W) images."""
    patch_size = int((x.shape[2] // channels) ** 0.5)
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1] and patch_size ** 2 * channels == x.shape[2]
    return einops.rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)",
                            h=h, p1=patch_size, p2=patch_size)


#################################################################################
#                                  Core Layers                                  #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention on fused qkv, written with einops."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = self.qkv(x)  # (B, L, 3 * D)
        qkv = einops.rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, L, D / H)
        x = F.scaled_dot_product_attention(q, k, v)
        x = einops.rearrange(x, "B H L D -> B L (H D)")  # (B, L, D)
        return self.proj(x)


class Block(nn.Module):
    """A pre-norm transformer block; with `skip=True` it first merges a long skip."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x  # (B, L, D)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution."""

    def __init__(self, patch_size, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        assert H % self.patch_size == 0 and W % self.patch_size == 0
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)
        return x


#################################################################################
#                                 Core U-ViT Model                              #
#################################################################################

class UViT(nn.Module):
    """Diffusion model with a ViT backbone, token conditioning and long skips."""

    def __init__(self, img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=13,
                 num_heads=8, mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False,
                 num_classes=-1, conv=True):
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2

        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.SiLU(),
            nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        self.in_blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2)
        ])
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(depth // 2)
        ])

        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x, timesteps, y=None):
        """
        x: (B, C, H, W) images or latents; timesteps: (B,); y: (B,) labels, if conditional.
        """
        x = self.patch_embed(x)  # (B, L, D)
        B, L, D = x.shape

        time_token = self.time_embed(timestep_embedding(timesteps, D))  # (B, D)
        time_token = time_token.unsqueeze(dim=1)  # (B, 1, D)
        x = torch.cat((time_token, x), dim=1)  # (B, 1 + L, D)
        if y is not None:
            label_emb = self.label_emb(y).unsqueeze(dim=1)  # (B, 1, D)
            x = torch.cat((label_emb, x), dim=1)  # (B, 2 + L, D)
        x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())  # (B, extras + L, D)

        x = self.norm(x)
        x = self.decoder_pred(x)  # (B, extras + L, p * p * C)
        assert x.size(1) == self.extras + L
        x = x[:, self.extras:, :]  # (B, L, p * p * C)
        x = unpatchify(x, self.in_chans)  # (B, C, H, W)
        x = self.final_layer(x)
        return x


#################################################################################
#                                  U-ViT Configs                                #
#################################################################################

def UViT_S_2(**kwargs):
    kwargs.setdefault("num_classes", 1001)
    return UViT(img_size=32, patch_size=2, embed_dim=512, depth=13, num_heads=8, **kwargs)

def UViT_M_2(**kwargs):
    kwargs.setdefault("num_classes", 1001)
    return UViT(img_size=32, patch_size=2, embed_dim=768, depth=17, num_heads=12, **kwargs)

def UViT_T_2(**kwargs):
    """Tiny test and demo size; not from the paper."""
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("num_classes", 10)
    return UViT(patch_size=2, in_chans=4, embed_dim=64, depth=7, num_heads=4, **kwargs)


UViT_models = {
    "U-ViT-S/2": UViT_S_2,
    "U-ViT-M/2": UViT_M_2,
    "U-ViT-T/2": UViT_T_2,
}


#################################################################################
#                              Inspection Helpers                               #
#################################################################################

def build_model(name="U-ViT-S/2", **kw):
    """Builds a U-ViT size by name.

    Args:
        name: a key of `UViT_models`, e.g. "U-ViT-S/2".
        **kw: constructor overrides, e.g. `img_size=16` or `num_classes=-1` (unconditional).

    Returns:
        The `UViT` module, freshly initialised.

    Example:
        >>> len(build_model("U-ViT-T/2").in_blocks)
        3
    """
    if name not in UViT_models:
        raise ValueError(f"unknown U-ViT size {name!r}; valid names: {sorted(UViT_models)}")
    return UViT_models[name](**kw)


def example_inputs(model, batch=2):
    """Returns `(x, timesteps, y)` sized for `model`; `y` is None for an unconditional model.

    Example:
        >>> x, t, y = example_inputs(build_model("U-ViT-T/2"), batch=3)
        >>> tuple(x.shape), tuple(t.shape), tuple(y.shape)
        ((3, 4, 16, 16), (3,), (3,))
    """
    device = model.pos_embed.device
    size = model.img_size
    x = torch.randn(batch, model.in_chans, size, size, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.randint(0, model.num_classes, (batch,), device=device) if model.num_classes > 0 else None
    return x, t, y
