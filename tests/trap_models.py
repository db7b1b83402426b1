"""Trap models for tests/test_traps.py plus a generic hand-written TREAD reference.

Every trap model is a `TrapModel`: `forward` = `pre` -> `step(i, h, ctx)` for every block -> `post`.
`step` holds whatever the model does around block i (residual adds outside the block, scaling,
side inputs); `ctx` is a dict of side values. The reference `tread` replays the same three
pieces, gathering the token stream (along `token_dim`) and the ctx entries named in
`ctx_tokens` (key -> token dims) at each route start, and scattering the stream back into the
route-start stream after the route's end block. Not a test module (no assert rewriting).
"""
import dataclasses
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

N_IMG = 16  # (B, 4, 8, 8) latent, patch 2


# ----------------------------------------------------------------------------- helpers
def _perm_to_front(x, dim, bdim):
    perm = [bdim, dim] + [d for d in range(x.dim()) if d not in (bdim, dim)]
    inv = [perm.index(d) for d in range(x.dim())]
    return perm, inv


def _idx(ids, like):
    return ids.view(*ids.shape, *(1,) * (like.dim() - 2)).expand(*ids.shape, *like.shape[2:])


def take(x, ids, dim=1, bdim=0):
    """Per-sample rows `ids` (B, k) of token dim `dim`; batch dim `bdim` (size B or 1)."""
    perm, inv = _perm_to_front(x, dim, bdim)
    xp = x.permute(perm)
    if xp.shape[0] != ids.shape[0]:
        xp = xp.expand(ids.shape[0], *xp.shape[1:])
    return xp.gather(1, _idx(ids, xp)).permute(inv)


def put(base, ids, kept, dim=1, bdim=0):
    """Out of place: `base` with rows `ids` of token dim `dim` replaced by `kept`."""
    perm, inv = _perm_to_front(base, dim, bdim)
    bp, kp = base.permute(perm), kept.permute(perm)
    return bp.scatter(1, _idx(ids, kp), kp).permute(inv)


def draw_ids(B, N, ratio, protect=0):
    n = N - protect
    n_keep = n - int(n * ratio)
    ids = torch.rand(B, n).argsort(1)[:, :n_keep].sort(1).values + protect
    return torch.cat([torch.arange(protect).expand(B, -1), ids], 1)


def tread(model, inputs, routes, protect=0):
    """Generic TREAD reference over a TrapModel. Returns (output, [ids per route])."""
    args, kwargs = split_inputs(inputs)
    h, ctx = model.pre(*args, **kwargs)
    tdim, bdim = model.token_dim, model.batch_dim
    spec = dict(model.ctx_tokens)
    open_, all_ids = {}, []
    for i in range(model.depth):
        for j, (s, e, r) in enumerate(routes):
            if i == s:
                ids = draw_ids(h.shape[bdim], h.shape[tdim], r, protect)
                all_ids.append(ids)
                present = [k for k in spec if k in ctx]
                open_[j] = (h, {k: ctx[k] for k in present}, ids)
                h = take(h, ids, tdim, bdim)
                for k in present:
                    dims, v = spec[k], ctx[k]
                    for d in dims:
                        v = take(v, ids, d, 0)
                    ctx[k] = v
        h = model.step(i, h, ctx)
        for j in reversed(range(len(routes))):
            if routes[j][1] == i:
                base, saved, ids = open_.pop(j)
                h = put(base, ids, h, tdim, bdim)
                ctx.update(saved)
    return model.post(h, ctx), all_ids


def split_inputs(inputs):
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict) \
            and isinstance(inputs[0], tuple):
        return inputs
    return tuple(inputs), {}


def randomize(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def latent(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g)


def randn(*shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# ----------------------------------------------------------------------------- modules
class Attn(nn.Module):
    """Plain multi-head attention; kv from `mem` (cross) or x (self)."""

    def __init__(self, d, heads=2, kv_dim=None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(kv_dim or d, d)
        self.v = nn.Linear(kv_dim or d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x, mem=None, mask=None, bias=None):
        kv = x if mem is None else mem
        B, T, _ = x.shape
        Bk, M, _ = kv.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k(kv).view(Bk, M, self.heads, -1).transpose(1, 2)
        v = self.v(kv).view(Bk, M, self.heads, -1).transpose(1, 2)
        a = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            a = a + bias
        if mask is not None:
            a = a.masked_fill(~mask[:, None, None, :], -1e4)
        a = a.softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, d, out=None):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, out or d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Body(nn.Module):
    """Residual-free block body: attn(ln x) + mlp(ln x); the model adds the residual."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = Attn(d, heads)
        self.mlp = MLP(d)

    def forward(self, x, mask=None, bias=None):
        y = self.ln(x)
        return self.attn(y, mask=mask, bias=bias) + self.mlp(y)


class Block(nn.Module):
    """Pre-LN block with its residuals inside; optional cross-attention memory, adaLN cond."""

    def __init__(self, d, heads=2, mem_dim=None, cond_dim=None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attn(d, heads)
        self.cross = Attn(d, heads, kv_dim=mem_dim) if mem_dim else None
        self.mlp = MLP(d)
        self.ada = nn.Linear(cond_dim, 2 * d) if cond_dim else None

    def forward(self, x, mem=None, cond=None, mask=None, bias=None, mem_mask=None):
        y = self.ln1(x)
        if self.ada is not None:
            sc, sh = self.ada(cond).unsqueeze(1).chunk(2, -1)
            y = y * (1 + sc) + sh
        x = x + self.attn(y, mask=mask, bias=bias)
        if self.cross is not None:
            x = x + self.cross(x, mem=mem, mask=mem_mask)
        return x + self.mlp(self.ln2(x))


class PatchEmbed(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Conv2d(4, d, 2, stride=2)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- base model
class TrapModel(nn.Module):
    token_dim = 1
    batch_dim = 0
    ctx_tokens = {}

    def __init__(self, d=12, depth=5, out=8):
        super().__init__()
        self.d, self.depth = d, depth
        self.embed = PatchEmbed(d)
        self.pos = nn.Parameter(torch.zeros(1, N_IMG, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def embed_img(self, x):
        return self.embed(x) + self.pos

    def pre(self, x):
        return self.embed_img(x), {}

    def step(self, i, h, ctx):
        return self.blocks[i](h)

    def post(self, h, ctx):
        return self.head(self.norm(h))

    def forward(self, x):
        h, ctx = self.pre(x)
        for i in range(self.depth):
            h = self.step(i, h, ctx)
        return self.post(h, ctx)

    def __init_subclass__(cls, **kw):
        """Give each subclass a forward with `pre`'s real signature (routefx reads arg names)."""
        super().__init_subclass__(**kw)
        if "pre" in cls.__dict__ and "forward" not in cls.__dict__:
            params = list(inspect.signature(cls.pre).parameters.values())[1:]
            sig = ", ".join(str(p) for p in params)
            names = ", ".join(p.name for p in params)
            src = (f"def forward(self, {sig}):\n"
                   f"    h, ctx = self.pre({names})\n"
                   f"    for i in range(self.depth):\n"
                   f"        h = self.step(i, h, ctx)\n"
                   f"    return self.post(h, ctx)\n")
            ns = {}
            exec(compile(src, f"<forward of {cls.__name__}>", "exec"), ns)
            cls.forward = ns["forward"]


# ---- pattern 1: residuals outside the blocks
class ResOutside(TrapModel):
    def __init__(self, variant="add", heads=2, **kw):
        super().__init__(**kw)
        self.variant = variant
        self.blocks = nn.ModuleList(Body(self.d, heads) for _ in range(self.depth))

    def step(self, i, h, ctx):
        if self.variant == "add":
            return h + self.blocks[i](h)
        return self.blocks[i](h) + h


class CondBody(nn.Module):
    def __init__(self, d, cond_dim):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.ada = nn.Linear(cond_dim, 2 * d)
        self.attn = Attn(d)
        self.mlp = MLP(d)

    def forward(self, x, c):
        sc, sh = self.ada(c).unsqueeze(1).chunk(2, -1)
        y = self.ln(x) * (1 + sc) + sh
        return self.attn(y) + self.mlp(y)


class ResScaledCond(TrapModel):
    """h = h + 0.5 * blk(h, c) (variant "half") or gated h = h + g * blk(h) (variant "gate")."""

    def __init__(self, variant="half", cond_dim=12, **kw):
        super().__init__(**kw)
        self.variant = variant
        self.cond = nn.Linear(cond_dim, cond_dim)
        self.blocks = nn.ModuleList(CondBody(self.d, cond_dim) for _ in range(self.depth))
        self.gates = nn.Parameter(torch.zeros(self.depth, self.d))

    def pre(self, x, c):
        return self.embed_img(x), {"c": F.silu(self.cond(c))}

    def step(self, i, h, ctx):
        if self.variant == "half":
            return h + 0.5 * self.blocks[i](h, ctx["c"])
        return h + self.gates[i] * self.blocks[i](h, ctx["c"])


class AttnOnly(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = Attn(d, heads)

    def forward(self, x):
        return self.attn(self.ln(x))


class FFOnly(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        return self.mlp(self.ln(x))


class AltAttnFF(TrapModel):
    """Separate attention / MLP modules as the blocks: x = attn(x) + x; x = ff(x) + x."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(AttnOnly(self.d) if i % 2 == 0 else FFOnly(self.d)
                                    for i in range(self.depth))

    def step(self, i, h, ctx):
        return self.blocks[i](h) + h


# ---- pattern 2: size coincidences
class CondModel(TrapModel):
    """adaLN conditioning vector (B, cond_dim); block(h, cond=c)."""

    def __init__(self, cond_dim=16, heads=2, **kw):
        super().__init__(**kw)
        self.cond = nn.Linear(cond_dim, cond_dim)
        self.blocks = nn.ModuleList(Block(self.d, heads, cond_dim=cond_dim) for _ in range(self.depth))

    def pre(self, x, c):
        return self.embed_img(x), {"c": F.silu(self.cond(c))}

    def step(self, i, h, ctx):
        return self.blocks[i](h, cond=ctx["c"])


class TextModel(TrapModel):
    """Cross-attention to a text context (B, L, Dt) embedded at the top."""

    def __init__(self, text_dim=10, mem_mask=False, **kw):
        super().__init__(**kw)
        self.txt = nn.Linear(text_dim, self.d)
        self.use_mask = mem_mask
        self.blocks = nn.ModuleList(Block(self.d, mem_dim=self.d) for _ in range(self.depth))

    def pre(self, x, text, text_mask=None):
        return self.embed_img(x), {"mem": self.txt(text), "mm": text_mask}

    def step(self, i, h, ctx):
        return self.blocks[i](h, mem=ctx["mem"], mem_mask=ctx["mm"])


class LearnedMem(TrapModel):
    """A learned (1, 16, D) memory parameter as cross-attention context for every block."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.mem = nn.Parameter(torch.zeros(1, N_IMG, self.d))
        self.blocks = nn.ModuleList(Block(self.d, mem_dim=self.d) for _ in range(self.depth))

    def step(self, i, h, ctx):
        return self.blocks[i](h, mem=self.mem)


class CFGNull(TrapModel):
    """Classifier-free guidance: a null context expanded to the batch, length 16."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.null = nn.Parameter(torch.zeros(1, N_IMG, self.d))
        self.txt = nn.Linear(self.d, self.d)
        self.blocks = nn.ModuleList(Block(self.d, mem_dim=self.d) for _ in range(self.depth))

    def pre(self, x, text, drop):
        null = self.null.expand(x.shape[0], -1, -1)
        mem = torch.where(drop[:, None, None], null, self.txt(text))
        return self.embed_img(x), {"mem": mem}

    def step(self, i, h, ctx):
        return self.blocks[i](h, mem=ctx["mem"])


# ---- pattern 3: token layouts between blocks
class SeqFirstBlock(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mha = nn.MultiheadAttention(d, heads)
        self.mlp = MLP(d)

    def forward(self, x):  # (N, B, D)
        y = self.ln1(x)
        x = x + self.mha(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class SeqFirst(TrapModel):
    token_dim, batch_dim = 0, 1

    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(SeqFirstBlock(self.d) for _ in range(self.depth))

    def pre(self, x):
        return self.embed_img(x).transpose(0, 1), {}

    def post(self, h, ctx):
        return self.head(self.norm(h.transpose(0, 1)))


class ChanFirstBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.inner = Block(d)
        self.mix = nn.Conv1d(d, d, 1)

    def forward(self, x):  # (B, D, N)
        return self.mix(self.inner(x.transpose(1, 2)).transpose(1, 2))


class ChanFirst(TrapModel):
    token_dim = 2

    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(ChanFirstBlock(self.d) for _ in range(self.depth))

    def pre(self, x):
        return self.embed_img(x).transpose(1, 2), {}

    def post(self, h, ctx):
        return self.head(self.norm(h.transpose(1, 2)))


class GridMLP(nn.Module):
    def __init__(self, d, conv=False):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = MLP(d)
        self.conv = nn.Conv2d(d, d, 3, padding=1, groups=d) if conv else None

    def forward(self, x):  # (B, H, W, D)
        if self.conv is not None:
            x = x + self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(self.ln(x))


class Grid(TrapModel):
    """(B, H, W, D) grid between blocks."""

    def __init__(self, conv=False, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(GridMLP(self.d, conv) for _ in range(self.depth))

    def pre(self, x):
        return self.embed_img(x).view(x.shape[0], 4, 4, self.d), {}

    def post(self, h, ctx):
        return self.head(self.norm(h.flatten(1, 2)))


def tread_grid(model, inputs, routes):
    """Grid reference: the token dim is H*W flattened; blocks are per-token."""
    (x,) = inputs
    h, ctx = model.pre(x)
    B, H, W, D = h.shape
    ids_all, saved = [], {}
    for i in range(model.depth):
        for j, (s, e, r) in enumerate(routes):
            if i == s:
                ids = draw_ids(B, H * W, r)
                ids_all.append(ids)
                saved[j] = (h, ids)
                h = take(h.reshape(B, H * W, D), ids)[:, :, None]  # (B, k, 1, D)
        h = model.step(i, h, ctx)
        for j, (s, e, r) in enumerate(routes):
            if i == e:
                base, ids = saved.pop(j)
                h = put(base.reshape(B, H * W, D), ids, h[:, :, 0]).view(B, H, W, D)
    return model.post(h, ctx), ids_all


# ---- pattern 4: per-token side inputs
class MaskModel(TrapModel):
    """Key-padding mask (B, N) bool into every block's self-attention."""
    ctx_tokens = {"mask": (1,)}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(Block(self.d) for _ in range(self.depth))

    def pre(self, x, mask):
        return self.embed_img(x), {"mask": mask}

    def step(self, i, h, ctx):
        return self.blocks[i](h, mask=ctx["mask"])


class BiasModel(TrapModel):
    """Additive attention bias (B, 1|heads, N, N) into every block."""
    ctx_tokens = {"bias": (2, 3)}

    def __init__(self, heads=2, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(Block(self.d, heads) for _ in range(self.depth))

    def pre(self, x, bias):
        return self.embed_img(x), {"bias": bias}

    def step(self, i, h, ctx):
        return self.blocks[i](h, bias=ctx["bias"])


class TokCondBlock(nn.Module):
    """Per-token modulation: cond (B, N, Dc)."""

    def __init__(self, d, cond_dim):
        super().__init__()
        self.inner = Block(d)
        self.ada = nn.Linear(cond_dim, 2 * d)

    def forward(self, x, cond):
        sc, sh = self.ada(cond).chunk(2, -1)
        return self.inner(x * (1 + sc) + sh)


class TokTimeModel(TrapModel):
    """Per-token timesteps (B, N): raw into every block (variant "raw") or embedded at the top
    into a (B, N, D) intermediate (variant "embed"); class map (B, N, D) input (variant "cmap")."""
    ctx_tokens = {"t": (1,)}

    def __init__(self, variant="raw", **kw):
        super().__init__(**kw)
        self.variant = variant
        cd = 1 if variant == "raw" else self.d
        self.temb = nn.Linear(1, self.d)
        self.blocks = nn.ModuleList(TokCondBlock(self.d, cd) for _ in range(self.depth))

    def pre(self, x, t):
        if self.variant == "raw":
            return self.embed_img(x), {"t": t[..., None]}
        if self.variant == "embed":
            return self.embed_img(x), {"t": F.silu(self.temb(t[..., None]))}
        return self.embed_img(x), {"t": t}

    def step(self, i, h, ctx):
        return self.blocks[i](h, ctx["t"])


class RawTimeBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.inner = TokCondBlock(d, d)
        self.temb = nn.Linear(1, d)

    def forward(self, x, t):  # t (B, N) raw
        return self.inner(x, F.silu(self.temb(t[..., None])))


class RawTimeModel(TrapModel):
    """The raw per-token timestep tensor (B, N) itself enters every block."""
    ctx_tokens = {"t": (1,)}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(RawTimeBlock(self.d) for _ in range(self.depth))

    def pre(self, x, t):
        return self.embed_img(x), {"t": t}

    def step(self, i, h, ctx):
        return self.blocks[i](h, ctx["t"])


# ---- pattern 5: positions computed inside a block from its input length
def sincos(T, d, dtype):
    pos = torch.arange(T, dtype=dtype)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, d, 2, dtype=dtype) / d)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1)


class RopeAttn(Attn):
    def forward(self, x, mem=None, mask=None, bias=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, -1).transpose(1, 2)
        hd = q.shape[-1]
        ang = torch.arange(T, dtype=x.dtype)[:, None] * torch.exp(
            -math.log(50.0) * torch.arange(hd // 2, dtype=x.dtype) / (hd // 2))
        cos, sin = ang.cos(), ang.sin()

        def rot(t):
            a, b = t[..., : hd // 2], t[..., hd // 2:]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

        a = (rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1))


class PosBlock(nn.Module):
    """kind "rope": rotary from torch.arange(x.shape[1]); "slice": self.pos[:, :x.shape[1]];
    "sincos": sincos(x.shape[1]) added to the input."""

    def __init__(self, d, kind):
        super().__init__()
        self.kind = kind
        self.inner = Block(d)
        if kind == "rope":
            self.inner.attn = RopeAttn(d, 2)
        if kind == "slice":
            self.pos = nn.Parameter(torch.zeros(1, 32, d))

    def forward(self, x):
        if self.kind == "slice":
            x = x + self.pos[:, : x.shape[1]]
        elif self.kind == "sincos":
            x = x + sincos(x.shape[1], x.shape[2], x.dtype)
        return self.inner(x)


class PosInside(TrapModel):
    def __init__(self, kind="rope", **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(PosBlock(self.d, kind) for _ in range(self.depth))


# ---- pattern 6: block outputs with aux values
@dataclasses.dataclass
class BlockOut:
    hidden_states: torch.Tensor
    extra: torch.Tensor


class AuxBlock(nn.Module):
    def __init__(self, d, kind):
        super().__init__()
        self.kind = kind
        self.inner = Block(d)
        self.router = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inner(x)
        if self.kind == "tuple":
            return h, self.router(h)
        if self.kind == "dict":
            return {"h": h, "aux": h.mean(1)}
        return BlockOut(hidden_states=h, extra=self.router(h).pow(2).mean())


class AuxModel(TrapModel):
    """tuple: (h, router_logits) summed into an aux loss; dict: {"h", "aux": pooled};
    dataclass: .hidden_states + .extra."""

    def __init__(self, kind="tuple", **kw):
        super().__init__(**kw)
        self.kind = kind
        self.blocks = nn.ModuleList(AuxBlock(self.d, kind) for _ in range(self.depth))
        self.pool_proj = nn.Linear(self.d, 8)

    def pre(self, x):
        h = self.embed_img(x)
        return h, {"aux": h.new_zeros(()), "pool": h.new_zeros(h.shape[0], self.d)}

    def step(self, i, h, ctx):
        o = self.blocks[i](h)
        if self.kind == "tuple":
            h, lg = o
            ctx["aux"] = ctx["aux"] + lg.softmax(-1).pow(2).mean()
        elif self.kind == "dict":
            h = o["h"]
            ctx["pool"] = ctx["pool"] + o["aux"]
        else:
            h = o.hidden_states
            ctx["aux"] = ctx["aux"] + o.extra
        return h

    def post(self, h, ctx):
        return self.head(self.norm(h)) + self.pool_proj(ctx["pool"])[:, None], ctx["aux"]


class RepaModel(TrapModel):
    """Returns (out, hidden of block `layer`) - the REPA target hidden."""

    def __init__(self, layer=2, **kw):
        super().__init__(**kw)
        self.layer = layer
        self.blocks = nn.ModuleList(Block(self.d) for _ in range(self.depth))
        self.proj = nn.Linear(self.d, 6)

    def step(self, i, h, ctx):
        h = self.blocks[i](h)
        if i == self.layer:
            ctx["repa"] = self.proj(h)
        return h

    def post(self, h, ctx):
        return self.head(self.norm(h)), ctx["repa"]


# ---- pattern 7: prefix tokens
class PrefixModel(TrapModel):
    """Joint attention over [text (+ registers) ; image]; the head reads the image slice.
    kind: "hstack", "assign" (item assignment into a preallocated sequence)."""

    def __init__(self, L=5, regs=0, kind="hstack", text_dim=10, **kw):
        super().__init__(**kw)
        self.L, self.kind = L, kind
        self.txt = nn.Linear(text_dim, self.d)
        self.regs = nn.Parameter(torch.zeros(1, regs, self.d)) if regs else None
        self.blocks = nn.ModuleList(Block(self.d) for _ in range(self.depth))

    def pre(self, x, text):
        img, t = self.embed_img(x), self.txt(text)
        if self.regs is not None:
            t = torch.cat([t, self.regs.expand(x.shape[0], -1, -1)], 1)
        if self.kind == "hstack":
            return torch.hstack([t, img]), {"P": t.shape[1]}
        seq = img.new_zeros(x.shape[0], t.shape[1] + img.shape[1], self.d)
        seq[:, : t.shape[1]] = t
        seq[:, t.shape[1]:] = img
        return seq, {"P": t.shape[1]}

    def post(self, h, ctx):
        return self.head(self.norm(h[:, ctx["P"]:]))


class SuffixModel(TrapModel):
    """Text AFTER the image: [image ; text]; the head reads h[:, :16]."""

    def __init__(self, L=5, text_dim=10, **kw):
        super().__init__(**kw)
        self.txt = nn.Linear(text_dim, self.d)
        self.blocks = nn.ModuleList(Block(self.d) for _ in range(self.depth))

    def pre(self, x, text):
        return torch.cat([self.embed_img(x), self.txt(text)], 1), {}

    def post(self, h, ctx):
        return self.head(self.norm(h[:, :N_IMG]))


def tread_suffix(model, inputs, routes):
    """Only the 16 leading image tokens are routable; the text suffix always goes through."""
    h, ctx = model.pre(*inputs)
    all_ids, saved = [], {}
    for i in range(model.depth):
        for j, (s, e, r) in enumerate(routes):
            if i == s:
                ids = draw_ids(h.shape[0], N_IMG, r)
                all_ids.append(ids)
                saved[j] = (h, ids)
                h = torch.cat([take(h[:, :N_IMG], ids), h[:, N_IMG:]], 1)
        h = model.step(i, h, ctx)
        for j, (s, e, r) in enumerate(routes):
            if i == e:
                base, ids = saved.pop(j)
                k = ids.shape[1]
                h = torch.cat([put(base[:, :N_IMG], ids, h[:, :k]), h[:, k:]], 1)
    return model.post(h, ctx), all_ids


# ---- pattern 8: several token-shaped block arguments
class X0Block(nn.Module):
    def __init__(self, d, swap):
        super().__init__()
        self.swap = swap
        self.inner = Block(d)
        self.mix = nn.Linear(d, d)

    def _f(self, x, x0):
        return self.inner(x + self.mix(x0))

    def forward(self, a, b):
        return self._f(b, a) if self.swap else self._f(a, b)


class X0Model(TrapModel):
    """blk(h, x0) / blk(x0, h) with the initial embedding x0 fed to every block."""
    ctx_tokens = {"x0": (1,)}

    def __init__(self, swap=False, same=False, **kw):
        super().__init__(**kw)
        self.swap, self.same = swap, same
        self.blocks = nn.ModuleList(X0Block(self.d, swap) for _ in range(self.depth))

    def pre(self, x):
        x0 = self.embed(x)
        return (x0 if self.same else x0 + self.pos), {"x0": x0}

    def step(self, i, h, ctx):
        if self.swap:
            return self.blocks[i](ctx["x0"], h)
        return self.blocks[i](h, ctx["x0"])


class KwBlock(nn.Module):
    def __init__(self, d, cond_dim):
        super().__init__()
        self.inner = Block(d, cond_dim=cond_dim)

    def forward(self, x, c):
        return self.inner(x, cond=c)


class KwModel(TrapModel):
    """blk(c=c, x=h): keyword call in the other order; cond width 16."""

    def __init__(self, cond_dim=16, **kw):
        super().__init__(**kw)
        self.blocks = nn.ModuleList(KwBlock(self.d, cond_dim) for _ in range(self.depth))

    def pre(self, x, c):
        return self.embed_img(x), {"c": c}

    def step(self, i, h, ctx):
        return self.blocks[i](c=ctx["c"], x=h)


# ---- pattern 9: top-level code between blocks
class TopOps(TrapModel):
    """kind "scale": h = blk(h) * s_i; "norm": F.layer_norm after each block; "center": tokens
    centred (h - h.mean(1)) before block 2 only; "meancond": c = h.mean(1) taken before block 2
    conditions blocks 2.. ; "pos": a (1, 16, D) table `pos2` added before every block."""

    def __init__(self, kind="scale", **kw):
        super().__init__(**kw)
        self.kind = kind
        self.blocks = nn.ModuleList(Block(self.d, cond_dim=self.d) for _ in range(self.depth))
        self.scales = nn.Parameter(torch.ones(self.depth, self.d))
        self.pos2 = nn.Parameter(torch.zeros(1, N_IMG, self.d))
        self.c0 = nn.Parameter(torch.zeros(1, self.d))
        if kind == "pos":
            self.ctx_tokens = {"pos": (1,)}

    def pre(self, x):
        h = self.embed_img(x)
        return h, {"c": self.c0.expand(x.shape[0], -1), "pos": self.pos2}

    def step(self, i, h, ctx):
        if self.kind == "center" and i == 2:
            h = h - h.mean(1, keepdim=True)
        if self.kind == "meancond" and i == 2:
            ctx["c"] = h.mean(1)
        if self.kind == "pos":
            h = h + ctx["pos"]
        h = self.blocks[i](h, cond=ctx["c"])
        if self.kind == "scale":
            h = h * self.scales[i]
        if self.kind == "norm":
            h = F.layer_norm(h, (self.d,))
        return h


class UViT(TrapModel):
    """U-ViT long skips concatenated OUTSIDE the blocks: block i >= depth/2 reads
    fuse(cat([h, skip_{depth-1-i}], -1))."""
    ctx_tokens = {"s0": (1,), "s1": (1,), "s2": (1,)}

    def __init__(self, **kw):
        kw.setdefault("depth", 6)
        super().__init__(**kw)
        self.blocks = nn.ModuleList(Block(self.d) for _ in range(self.depth))
        self.fuse = nn.ModuleList(nn.Linear(2 * self.d, self.d) for _ in range(self.depth // 2))

    def step(self, i, h, ctx):
        half = self.depth // 2
        if i >= half:
            h = self.fuse[i - half](torch.cat([h, ctx[f"s{self.depth - 1 - i}"]], -1))
        h = self.blocks[i](h)
        if i < half:
            ctx[f"s{i}"] = h
        return h


class RegBlock(nn.Module):
    """Appends 4 registers inside, returns (B, T + 4, D)."""

    def __init__(self, d):
        super().__init__()
        self.regs = nn.Parameter(torch.zeros(1, 4, d))
        self.inner = Block(d)

    def forward(self, x):
        return self.inner(torch.cat([x, self.regs.expand(x.shape[0], -1, -1)], 1))


class SlicedOut(TrapModel):
    """h = blk(h)[:, :h.shape[1]] (kind "shape") or blk(h)[:, :self.n] with n = 16 ("const")."""

    def __init__(self, kind="shape", **kw):
        super().__init__(**kw)
        self.kind, self.n = kind, N_IMG
        self.blocks = nn.ModuleList(RegBlock(self.d) for _ in range(self.depth))

    def step(self, i, h, ctx):
        if self.kind == "shape":
            return self.blocks[i](h)[:, : h.shape[1]]
        return self.blocks[i](h)[:, : self.n]


# ---- parametric model for the Hypothesis test
class HypoModel(TrapModel):
    """d = 16; cross-attention to a text of length L (any, 16 included); adaLN cond of width C;
    `heads` heads; residual written outside the block when `outside`."""

    def __init__(self, C=16, heads=2, outside=False, depth=5, **kw):
        super().__init__(d=16, depth=depth, **kw)
        self.outside = outside
        self.txt = nn.Linear(10, self.d)
        self.cond = nn.Linear(C, C)
        self.blocks = nn.ModuleList(Block(self.d, heads, mem_dim=self.d, cond_dim=C)
                                    for _ in range(depth))

    def pre(self, x, text, c):
        return self.embed_img(x), {"mem": self.txt(text), "c": F.silu(self.cond(c))}

    def step(self, i, h, ctx):
        o = self.blocks[i](h, mem=ctx["mem"], cond=ctx["c"])
        return h + 0.5 * o if self.outside else o


# ---- more: joint attention, dual streams, residual spellings, memories from the image
class JointBlock(nn.Module):
    """Concatenates [text ; x] INSIDE the block, returns the x part (text not routed)."""

    def __init__(self, d):
        super().__init__()
        self.inner = Block(d)

    def forward(self, x, text):
        return self.inner(torch.cat([text, x], 1))[:, text.shape[1]:]


class JointInside(TrapModel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.txt = nn.Linear(10, self.d)
        self.blocks = nn.ModuleList(JointBlock(self.d) for _ in range(self.depth))

    def pre(self, x, text):
        return self.embed_img(x), {"text": self.txt(text)}

    def step(self, i, h, ctx):
        return self.blocks[i](h, ctx["text"])


class DualBlock(nn.Module):
    """MMDiT-style: (img, txt) -> (img, txt), joint attention, both streams updated."""

    def __init__(self, d):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(d, d), nn.Linear(d, d)
        self.attn = Attn(d)
        self.img_mlp, self.txt_mlp = MLP(d), MLP(d)
        self.ln = nn.LayerNorm(d)

    def forward(self, img, txt):
        L = txt.shape[1]
        a = self.attn(torch.cat([self.txt_in(self.ln(txt)), self.img_in(self.ln(img))], 1))
        txt, img = txt + a[:, :L], img + a[:, L:]
        return img + self.img_mlp(self.ln(img)), txt + self.txt_mlp(self.ln(txt))


class DualStream(TrapModel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.txt = nn.Linear(10, self.d)
        self.blocks = nn.ModuleList(DualBlock(self.d) for _ in range(self.depth))
        self.txt_head = nn.Linear(self.d, 3)

    def pre(self, x, text):
        return self.embed_img(x), {"txt": self.txt(text)}

    def step(self, i, h, ctx):
        h, ctx["txt"] = self.blocks[i](h, ctx["txt"])
        return h

    def post(self, h, ctx):
        return self.head(self.norm(h)), self.txt_head(ctx["txt"])


class ResSpell(TrapModel):
    """Residual spellings outside the block: "inplace" h += blk(h); "add_alpha"
    torch.add(h, blk(h), alpha=0.5); "addcmul" torch.addcmul(h, gate(c), blk(h));
    "tokgate" h + sigmoid(gate(h)) * blk(h); "x0res" blk(h) + a * x0 (x0 = initial embedding);
    "tuple_none" blk returns (h, None); "final_hidden" returns (out, h)."""
    ctx_tokens = {"x0": (1,)}

    def __init__(self, kind="inplace", **kw):
        super().__init__(**kw)
        self.kind = kind
        self.blocks = nn.ModuleList(Body(self.d) for _ in range(self.depth))
        self.gate = nn.Linear(self.d, self.d)
        self.alpha = nn.Parameter(torch.ones(()))
        self.cvec = nn.Parameter(torch.zeros(1, self.d))

    def pre(self, x):
        h = self.embed_img(x)
        return h, {"x0": h, "g": self.gate(self.cvec)[:, None]}

    def step(self, i, h, ctx):
        k, blk = self.kind, self.blocks[i]
        if k == "inplace":
            o = blk(h)
            h = h.clone()
            h += o
            return h
        if k == "add_alpha":
            return torch.add(h, blk(h), alpha=0.5)
        if k == "addcmul":
            return torch.addcmul(h, ctx["g"], blk(h))
        if k == "tokgate":
            return h + torch.sigmoid(self.gate(h)) * blk(h)
        if k == "x0res":
            return blk(h) + self.alpha * ctx["x0"]
        if k == "tuple_none":
            o = (h + blk(h), None)
            return o[0]
        return h + blk(h)

    def post(self, h, ctx):
        out = self.head(self.norm(h))
        return (out, h) if self.kind == "final_hidden" else out


class SelfMemory(TrapModel):
    """Cross-attention memory computed from the image embedding BEFORE the route (B, 16, D):
    a memory, not a per-token input."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.memproj = nn.Linear(self.d, self.d)
        self.blocks = nn.ModuleList(Block(self.d, mem_dim=self.d) for _ in range(self.depth))

    def pre(self, x):
        h = self.embed_img(x)
        return h, {"mem": self.memproj(h)}

    def step(self, i, h, ctx):
        return self.blocks[i](h, mem=ctx["mem"])


class TableAttn(Attn):
    def forward(self, x, table):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, -1).transpose(1, 2)
        if table.dim() == 2:
            table = table[None]
        cos, sin = table.cos()[:, None], table.sin()[:, None]
        hd = q.shape[-1] // 2

        def rot(t):
            a, b = t[..., :hd], t[..., hd:]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

        a = (rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(2 * hd)).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1))


class TableBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = TableAttn(d)
        self.mlp = MLP(d)

    def forward(self, x, table):
        x = x + self.attn(self.ln(x), table)
        return x + self.mlp(self.ln(x))


class RopeTable(TrapModel):
    """A precomputed unbatched rotary angle table buffer (16, head_dim / 2) into every block."""
    ctx_tokens = {"table": (1,)}

    def __init__(self, **kw):
        super().__init__(**kw)
        hd = self.d // 2
        ang = torch.arange(N_IMG, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, hd // 2)
        self.register_buffer("rope", ang)
        self.blocks = nn.ModuleList(TableBlock(self.d) for _ in range(self.depth))

    def pre(self, x):
        return self.embed_img(x), {}

    def step(self, i, h, ctx):
        return self.blocks[i](h, ctx["table"] if "table" in ctx else self.rope)


def tread_rope_table(model, inputs, routes):
    """The table is gathered per sample (expanded to the batch) inside the routes."""
    (x,) = inputs
    h, ctx = model.pre(x)
    ids_all, saved = [], {}
    for i in range(model.depth):
        for j, (s, e, r) in enumerate(routes):
            if i == s:
                ids = draw_ids(h.shape[0], N_IMG, r)
                ids_all.append(ids)
                saved[j] = (h, ids)
                h = take(h, ids)
                ctx["table"] = take(model.rope[None], ids)
        h = model.step(i, h, ctx)
        for j, (s, e, r) in enumerate(routes):
            if i == e:
                base, ids = saved.pop(j)
                h = put(base, ids, h)
                ctx.pop("table")
    return model.post(h, ctx), ids_all


class RegPrefix(TrapModel):
    """Learned register tokens (1, 4, D) prepended; the head drops them."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.regs = nn.Parameter(torch.zeros(1, 4, self.d))
        self.blocks = nn.ModuleList(Block(self.d) for _ in range(self.depth))

    def pre(self, x):
        return torch.cat([self.regs.expand(x.shape[0], -1, -1), self.embed_img(x)], 1), {}

    def post(self, h, ctx):
        return self.head(self.norm(h[:, 4:]))


class MaskAndText(TrapModel):
    """A per-token key-padding mask (B, 16) AND a text mask (B, 16) for a text of length 16."""
    ctx_tokens = {"mask": (1,)}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.txt = nn.Linear(10, self.d)
        self.blocks = nn.ModuleList(Block(self.d, mem_dim=self.d) for _ in range(self.depth))

    def pre(self, x, text, mask, text_mask):
        return self.embed_img(x), {"mem": self.txt(text), "mask": mask, "mm": text_mask}

    def step(self, i, h, ctx):
        return self.blocks[i](h, mem=ctx["mem"], mask=ctx["mask"], mem_mask=ctx["mm"])
