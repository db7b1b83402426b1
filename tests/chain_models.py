"""Small models for test_chains.py (issue 12, items 4 and 5): chains of several block types,
stacks outside the main chain, and a leaf module that returns a tuple. Kept out of the test
module so that pytest's assert rewriting never touches model code."""
import torch
import torch.nn as nn

D, P = 8, 2


def patchify(x):
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // P) * (w // P), c * P * P)


class Attn(nn.Module):
    """Token mixing (softmax attention, one head), residual inside."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + self.out(torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(x).tanh()


class Alternating(nn.Module):
    """attention module, MLP module, attention, ... in one ModuleList: one chain of 8."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, D)
        self.layers = nn.ModuleList([Attn() if i % 2 == 0 else MLP() for i in range(8)])
        self.head = nn.Linear(D, 16)

    def forward(self, x):
        h = self.embed(patchify(x))
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Refiners(nn.Module):
    """Lumina-style: a text refiner and an image refiner run side by side, then joint layers on
    cat([text, image]). All blocks are one class; the chain is the joint layers, text protected.
    Two time embedders of that class too (an embedder used twice is no chain either)."""

    def __init__(self):
        super().__init__()
        self.embed, self.text_in = nn.Linear(16, D), nn.Linear(5, D)
        self.t_embed, self.g_embed = MLP(), MLP()
        self.text_refiner = nn.ModuleList([Attn() for _ in range(2)])
        self.noise_refiner = nn.ModuleList([Attn() for _ in range(2)])
        self.layers = nn.ModuleList([Attn() for _ in range(5)])
        self.head = nn.Linear(D, 16)

    def prep(self, x, text, t):
        c = self.t_embed(t[:, None].expand(-1, D)) + self.g_embed(t[:, None].expand(-1, D) * 2)
        y = self.text_in(text)
        for blk in self.text_refiner:
            y = blk(y)
        h = self.embed(patchify(x)) + c[:, None]
        for blk in self.noise_refiner:
            h = blk(h)
        return torch.cat([y, h], dim=1)

    def forward(self, x, text, t):
        h = self.prep(x, text, t)
        for blk in self.layers:
            h = blk(h)
        return self.head(h[:, text.shape[1]:])


class Rope(nn.Module):
    """Rotary tables for N tokens: returns the tuple (cos, sin), each (N, D)."""

    def forward(self, n: int, device):
        pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
        freq = torch.arange(D, device=device, dtype=torch.float32)[None] + 1
        return torch.cos(pos * freq / 10), torch.sin(pos * freq / 10)


class RopeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x, rope):
        cos, sin = rope  # the tuple, passed whole
        return x + self.fc(x * cos + x.flip(-1) * sin).tanh()


class RopeLeaf(nn.Module):
    """A rotary module (made a leaf by the user, as routefx's hint says) returning a tuple that
    every block receives whole."""

    def __init__(self):
        super().__init__()
        self.embed, self.rope = nn.Linear(16, D), Rope()
        self.blocks = nn.ModuleList([RopeBlock() for _ in range(5)])
        self.head = nn.Linear(D, 16)

    def forward(self, x):
        h = self.embed(patchify(x))
        rope = self.rope(h.shape[1], h.device)
        for blk in self.blocks:
            h = blk(h, rope)
        return self.head(h)
