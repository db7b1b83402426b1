"""Shared test helpers: tiny models, inputs, and a hand-written TREAD reference."""
import torch

from routefx.backbones.dit import DiT


def tiny_dit(depth=6, input_size=8, seed=0, randomize=True, **kw):
    """A tiny DiT whose zero-init layers are randomized so every path carries signal."""
    torch.manual_seed(seed)
    kw = {"hidden_size": 32, "num_heads": 2, "num_classes": 10, **kw}
    m = DiT(input_size=input_size, patch_size=2, in_channels=4, depth=depth, **kw)
    if randomize:
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    return m


def dit_inputs(batch, input_size=8, in_channels=4, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, input_size, input_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def kept_ids(batch, n, ratio, generator=None):
    """The reference selection: rand -> argsort -> first n_keep, sorted (routefx decision)."""
    n_keep = n - int(n * ratio)
    return torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :n_keep].sort(dim=1).values


def _index(ids, like):
    return ids.view(*ids.shape, *(1,) * (like.dim() - 2)).expand(*ids.shape, *like.shape[2:])


def gather(x, ids):
    """x (B or 1, N, ...) -> (B, n_keep, ...): per-sample rows of the token dim (dim 1)."""
    if x.shape[0] != ids.shape[0]:
        x = x.expand(ids.shape[0], *x.shape[1:])
    return x.gather(1, _index(ids, x))


def scatter(base, ids, kept):
    """Out of place: `base` with the rows `ids` of its token dim replaced by `kept`."""
    return base.scatter(1, _index(ids, kept), kept)


def _take(x, ids):
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))


def tread_dit(model, x, t, y, routes):
    """TREAD.md section 1 written by hand over a DiT's forward (routes resolved, sorted)."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    saved = ids = None
    for i, block in enumerate(model.blocks):
        for r in routes:
            if i == r.start:
                saved, ids = h, kept_ids(h.shape[0], h.shape[1], r.ratio)
                h = _take(h, ids)
        h = block(h, c)
        for r in routes:
            if i == r.end:
                h = saved.scatter(1, ids[..., None].expand(-1, -1, h.shape[-1]), h)
    return model.unpatchify(model.final_layer(h, c))
