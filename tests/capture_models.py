"""Small models with ordinary Python over shape values in their ROOT forward (issue 12), for
test_capture_python.py. Kept out of the test module on purpose: pytest rewrites `assert`
statements in test files, and routefx must see them as users' code has them."""
import collections
import dataclasses
import functools

import torch
import torch.nn as nn

P, D, DEPTH = 2, 8, 4


class Block(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(x).tanh()


class Base(nn.Module):
    """Patchify -> tokens -> `prep` (the line under test) -> blocks -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4 * P * P, D)
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.head = nn.Linear(D, 3)
        self.table = nn.Parameter(torch.randn(1, 10, 10, D))

    def tokens(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 1, 3, 5)
        return self.embed(x.reshape(b, (h // P) * (w // P), c * P * P))

    def forward(self, x, *extra):
        h = self.prep(x, *extra)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


class Slice(Base):
    """SD3's cropped position table: slice bounds computed from the input size."""

    def prep(self, x):
        gh, gw = x.shape[2] // P, x.shape[3] // P
        top, left = (10 - gh) // 2, (10 - gw) // 2
        pos = self.table[:, top:top + gh, left:left + gw, :].reshape(1, -1, self.table.shape[-1])
        return self.tokens(x) + pos


class Range(Base):
    """`range(n)` over a traced size (Flux's rotary axes loop)."""

    def prep(self, x):
        h = self.tokens(x)
        return torch.cat([h[..., i:i + 1] * (i + 1) for i in range(h.shape[-1])], dim=-1)


class Round(Base):
    def prep(self, x):
        h = self.tokens(x)
        return h * (round(h.shape[1] * 0.3) / h.shape[1])


class ListTimesBatch(Base):
    """`[n] * batch` then `torch.tensor(...)`: the batch size in a Python list."""

    def prep(self, x):
        h = self.tokens(x)
        lens = torch.tensor([h.shape[1]] * x.shape[0], device=x.device)
        return h * lens[:, None, None] / 10


class Factories(Base):
    def prep(self, x):
        h = self.tokens(x)
        b, n = h.shape[:2]
        mask = torch.ones(b, n, device=x.device)
        pos = torch.arange(n, device=x.device, dtype=h.dtype)
        grid = torch.zeros(x.shape[2] // P, x.shape[3] // P, 3)
        return h * mask[..., None] + 0.01 * pos[None, :, None] + grid.sum()


class DeviceAndDtype(Base):
    """`x.device.type` as a string, `x.dtype` as a dtype."""

    def prep(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.tokens(x).to(x.dtype)
        if x.device.type == "mps":
            h = h * 2
        return h


class Tolist(Base):
    """`.tolist()` of a tensor built from shapes: a constant of the capture."""

    def prep(self, x):
        gh, gw = torch.tensor([x.shape[2] // P, x.shape[3] // P]).tolist()
        return self.tokens(x) * (gh * gw) / 16


class Asserts(Base):
    """A research DiT's label check: `assert labels.max() <= n - 1`, and `torch._assert`."""

    def prep(self, x, y):
        assert y.max() <= 9, "label out of range"
        torch._assert(y.min() >= 0, "negative label")
        return self.tokens(x) + y[:, None, None].float() * 0.1


class SetItemPrefix(Base):
    """Text then image written into a preallocated sequence (`seq[:, :t] = text`): the text is
    a protected prefix, never routed."""

    def prep(self, x, text):
        h = self.tokens(x)
        b, n, d = h.shape
        seq = h.new_zeros(b, text.shape[1] + n, d)
        seq[:, :text.shape[1]] = text
        seq[:, text.shape[1]:] = h
        return seq


class SetItemAfter(Base):
    def prep(self, x, text):
        h = self.tokens(x)
        seq = h.new_zeros(h.shape[0], h.shape[1] + text.shape[1], h.shape[2])
        seq[:, :h.shape[1]] = h
        seq[:, h.shape[1]:] = text
        return seq


@dataclasses.dataclass
class Output(collections.OrderedDict):
    """diffusers' `BaseOutput` pattern: an OrderedDict that is also a dataclass."""

    sample: torch.Tensor = None
    extra: torch.Tensor = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


class MappingDataclassOutput(Base):
    def prep(self, x):
        return self.tokens(x)

    def forward(self, x):
        return Output(sample=super().forward(x))


class PerSampleLoop(Base):
    """A Python loop over the batch (`range(x.shape[0])`): the graph is unrolled per batch size."""

    def prep(self, x):
        h = self.tokens(x)
        return torch.stack([h[i] * (1 + 0.1 * i) for i in range(x.shape[0])])


class PerSampleJoin(Base):
    """Z-Image's way: per sample, image tokens then text concatenated (dim 0), then stacked."""

    def prep(self, x, text):
        h = self.tokens(x)
        return torch.stack([torch.cat([h[i], text[i]]) for i in range(h.shape[0])])


# -- leaf modules that cache what they compute (run on fake tensors during capture) -------------

@functools.lru_cache(maxsize=8)
def _sincos(n: int, d: int) -> torch.Tensor:  # a module-level cache of a position table
    pos = torch.arange(n, dtype=torch.float32)[:, None] / (1.0 + torch.arange(d, dtype=torch.float32))
    return pos.sin()


class CachingPos(nn.Module):
    """A position module that caches its table, `how`: 'lru' (lru_cache on a method), 'module_lru'
    (a module-level lru_cache function), 'dict' (a dict attribute), 'attr' (a tensor attribute),
    'buffer' (a buffer registered on first use)."""

    def __init__(self, how, d=D):
        super().__init__()
        self.how, self.d = how, d
        self.freq = 1.0 / (1.0 + torch.arange(d, dtype=torch.float32))  # plain tensor attribute
        self._cache = {}
        self.cached = None

    @functools.lru_cache(maxsize=8)
    def _table(self, n):
        return (torch.arange(n, dtype=torch.float32)[:, None] * self.freq).sin()

    def forward(self, h):
        n = h.shape[1]
        if self.how == "lru":
            return h + self._table(n)
        if self.how == "module_lru":
            return h + _sincos(n, self.d)
        if self.how == "dict":
            if n not in self._cache:
                self._cache[n] = (torch.arange(n, dtype=torch.float32)[:, None] * self.freq).sin()
            return h + self._cache[n]
        if self.how == "attr":
            if self.cached is None or self.cached.shape[0] != n:
                self.cached = (torch.arange(n, dtype=torch.float32)[:, None] * self.freq).sin()
            return h + self.cached
        if "table" not in self._buffers:
            self.register_buffer("table", (torch.arange(n, dtype=torch.float32)[:, None] * self.freq).sin(),
                                 persistent=False)
        return h + self.table


class CachingLeaf(Base):
    """`pos` is passed as a leaf module (`leaf_modules=['pos']`)."""

    def __init__(self, how):
        super().__init__()
        self.pos = CachingPos(how)

    def prep(self, x):
        return self.pos(self.tokens(x))
