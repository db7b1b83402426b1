"""Small models for test_route_check.py (issue 13): residuals written outside the blocks, blocks
taking a fixed embedding beside the stream, positions counted inside a block, attention biases,
learned memories. Each has `prep` (embedding), `blocks`, `head`, and `call(i, blk, h, extra)`,
one loop step as the model's forward writes it, so that tests/test_route_check.py's reference
runs the same steps with TREAD's gather / scatter around them."""
import torch
import torch.nn as nn
import torch.nn.functional as F

D, P, C_IN, SIDE, N = 16, 2, 4, 8, 16


class Mix(nn.Module):
    """A block that returns only its update (the residual is the model's business)."""

    def __init__(self, d=D):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attend(nn.Module):
    """Self-attention over the tokens, optional additive bias `(B, 1 | heads, N, N)`, optional
    cross-attention memory."""

    def __init__(self, d=D, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)

    def forward(self, x, bias=None, memory=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if memory is not None:
            mk, mv = self.kv(memory).expand(b, -1, -1).view(b, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([k, mk], 2), torch.cat([v, mv], 2)
            if bias is not None:
                bias = F.pad(bias, (0, memory.shape[1]))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.o(out.transpose(1, 2).reshape(b, n, -1))


class Base(nn.Module):
    def __init__(self, blocks, depth=5):
        super().__init__()
        self.patch = nn.Conv2d(C_IN, D, P, P)
        self.blocks = nn.ModuleList([blocks() for _ in range(depth)])
        self.head = nn.Linear(D, 3)

    def prep(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)

    def forward(self, x, *extra):
        h, extra = self.prep(x), self.extras(x, *extra)
        for i, blk in enumerate(self.blocks):
            h = self.call(i, blk, h, extra)
        return self.head(h)

    def extras(self, x, *extra):
        return extra


class Residual(Base):
    """`h = h + blk(h)` and friends, `how` in: 'plus', 'plus_after', 'half', 'gated'."""

    def __init__(self, how):
        super().__init__(Mix)
        self.how = how
        self.gate = nn.Parameter(torch.randn(D))

    def call(self, i, blk, h, extra):
        if self.how == "plus":
            return h + blk(h)
        if self.how == "plus_after":
            return blk(h) + h
        if self.how == "half":
            return h + 0.5 * blk(h)
        return h + self.gate * blk(h)


class AttnThenMlp(nn.Module):
    """Alternating attention and MLP modules as separate blocks of one chain (residuals outside)."""

    def __init__(self, depth=3):
        super().__init__()
        self.patch = nn.Conv2d(C_IN, D, P, P)
        self.blocks = nn.ModuleList([Attend() if i % 2 == 0 else Mix() for i in range(2 * depth)])
        self.head = nn.Linear(D, 3)

    prep = Base.prep

    def forward(self, x):
        h = self.prep(x)
        for i, blk in enumerate(self.blocks):
            h = self.call(i, blk, h, ())
        return self.head(h)

    def call(self, i, blk, h, extra):
        return blk(h) if i % 2 == 0 else blk(h) + h  # (attention adds its residual, the MLP not)


class WithX0(nn.Module):
    """Blocks take the stream and the fixed initial embedding, in `order` 'hx0' or 'x0h'."""

    class Block(nn.Module):
        def __init__(self, order):
            super().__init__()
            self.order, self.fc = order, nn.Linear(2 * D, D)

        def forward(self, a, b):
            h, x0 = (a, b) if self.order == "hx0" else (b, a)
            return h + torch.tanh(self.fc(torch.cat([h, x0], -1)))

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.patch = nn.Conv2d(C_IN, D, P, P)
        self.pos = nn.Parameter(torch.randn(1, N, D))
        self.blocks = nn.ModuleList([self.Block(order) for _ in range(5)])
        self.head = nn.Linear(D, 3)

    prep = Base.prep

    def forward(self, x):
        x0 = self.prep(x)
        h = x0 + self.pos
        for i, blk in enumerate(self.blocks):
            h = blk(h, x0) if self.order == "hx0" else blk(x0, h)
        return self.head(h)


class CountedPositions(Base):
    """A block adds positions it computes from the number of tokens it receives."""

    class Block(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how, self.mix = how, Mix()
            self.table = nn.Parameter(torch.randn(1, N, D))

        def forward(self, x):
            n = x.shape[1]
            if self.how == "arange":
                pos = torch.sin(torch.arange(n, dtype=x.dtype, device=x.device)[None, :, None] * 0.3)
            else:
                pos = self.table[:, :n]
            return x + self.mix(x + pos)

    def __init__(self, how):
        super().__init__(lambda: self.Block(how))

    def call(self, i, blk, h, extra):
        return blk(h)


class Biased(Base):
    """Every block gets an additive attention bias `(B, 1, N, N)` (per-token on dims 2 and 3)."""

    def __init__(self):
        super().__init__(Attend)

    def forward(self, x, bias):
        return super().forward(x, bias)

    def call(self, i, blk, h, extra):
        return blk(h, bias=extra[0])


class Memory(Base):
    """Every block attends to a learned memory `(1, N, D)` as long as the image (not per-token)
    and gets a learned position table `(1, N, D)` added inside (per-token)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attend()

        def forward(self, x, memory, pos):
            return self.attn(x + pos, memory=memory)

    def __init__(self):
        super().__init__(self.Block)
        self.memory = nn.Parameter(torch.randn(1, N, D))
        self.pos = nn.Parameter(torch.randn(1, N, D))

    def extras(self, x):
        return self.memory, self.pos

    def call(self, i, blk, h, extra):
        return blk(h, *extra)


class Normed(Base):
    """BatchNorm in the embedding (running statistics) and a plain residual block chain."""

    def __init__(self):
        super().__init__(Mix)
        self.bn = nn.BatchNorm1d(D)

    def prep(self, x):
        return self.bn(self.patch(x).flatten(2)).transpose(1, 2)

    def call(self, i, blk, h, extra):
        return h + blk(h)
