"""Run-time pieces that routed graphs call: token selection, gather, scatter, guards."""
import torch
from torch import nn
from torch.fx.node import has_side_effect

from .errors import GuardError, RouteError

__all__ = ["RouteControl", "RouteSelector", "select_tokens", "gather_tokens", "gather_table", "gather_joined",
           "scatter_tokens", "scatter_joined", "check_guard", "check_assert", "setitem", "gather_side"]


class RouteControl:
    """Run-time switches shared by every route of one routed model."""

    def __init__(self, generator=None):
        self.generator = generator
        self.forced = False
        self.ratio_override = None  # None, one float for every route, or a list per route
        self.check_ids = None  # routefx.check's forced selections: (selector, x, others) -> ids

    def ratio(self, index: int, default: float) -> float:
        r = self.ratio_override
        if r is None:
            return default
        return r[index] if isinstance(r, (list, tuple)) else r


def select_tokens(batch: int, num_tokens: int, ratio: float, protect: int, device,
                  generator=None) -> torch.Tensor:
    """Sorted per-sample indices of the kept tokens, `(batch, protect + n_keep)`.

    Draws `torch.rand(batch, N)` (N = routable tokens) exactly as the TREAD reference and keeps
    the first `N - int(N * ratio)` of its argsort; the `protect` prefix tokens are always kept.
    """
    n = num_tokens - protect
    n_keep = n - int(n * ratio)
    if n_keep <= 0:
        raise RouteError(f"Route ratio {ratio} keeps no token of {n}: lower the ratio.")
    if generator is None:  # (the generator overload does not take a symbolic batch size)
        noise = torch.rand(batch, n, device=device)
    else:
        noise = torch.rand(batch, n, device=device, generator=generator)
    ids = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    if protect:
        prefix = torch.arange(protect, device=device).expand(batch, protect)
        ids = torch.cat([prefix, ids + protect], dim=1)
    return ids


class RouteSelector(nn.Module):
    """Graph node that draws one route's token indices when the route starts."""

    def __init__(self, index: int, ratio: float, protect: int, control: RouteControl, shared: bool = False):
        super().__init__()
        self.index, self.default_ratio, self.protect, self.control = index, ratio, protect, control
        self.shared = shared  # one index set for the whole batch (needed by unbatched tables)

    def forward(self, x: torch.Tensor, others: int = 0):
        """Indices into the stream's tokens: `x` carries them after its first `others` tokens, if
        any (text joined in front of the image tokens at the route start)."""
        if self.control.check_ids is not None:
            return self.control.check_ids(self, x, others)
        ratio = self.control.ratio(self.index, self.default_ratio)
        if ratio == 0:
            return None  # no RNG drawn, gathers and scatters become identities
        n = x.shape[1] - others
        if self.shared:
            ids = select_tokens(1, n, ratio, self.protect, x.device, self.control.generator)
            return ids.expand(x.shape[0], -1)
        return select_tokens(x.shape[0], n, ratio, self.protect, x.device, self.control.generator)

    def extra_repr(self) -> str:
        return f"route={self.index}, ratio={self.default_ratio}, protect={self.protect}, shared={self.shared}"


def _token_index(ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = ids.shape + (1,) * (like.dim() - 2)
    return ids.view(shape).expand(ids.shape[0], ids.shape[1], *like.shape[2:])


def gather_tokens(x: torch.Tensor, ids, shared: bool = False):
    """`x[b, ids[b]]` along dim 1; a broadcast `(1, N, ...)` tensor is gathered per sample, or,
    with `shared` (one index set for the batch), stays `(1, n_kept, ...)` and broadcasts as before."""
    if ids is None:
        return x
    if shared and x.shape[0] == 1:
        ids = ids[:1]
    if x.shape[0] != ids.shape[0]:
        x = x.expand(ids.shape[0], *x.shape[1:])
    return x.gather(1, _token_index(ids, x))


def gather_side(x: torch.Tensor, ids, dims=(1,)):
    """A per-token side input (a mask `(B, N)`, a bias `(B, h, N, N)`) for the kept tokens: the
    rows `ids[b]` of sample b along each of `dims` (a broadcast dim 0 of size 1 is expanded)."""
    if ids is None:
        return x
    if x.shape[0] != ids.shape[0]:
        x = x.expand(ids.shape[0], *x.shape[1:])
    for d in dims:
        moved = x.movedim(d, 1)
        x = moved.gather(1, _token_index(ids, moved)).movedim(1, d)
    return x


def gather_table(table: torch.Tensor, ids, stream, dim: int, shared: bool = False):
    """Rows of a per-token table for the kept tokens, along `dim` (0: unbatched, 1: `(1, S, ...)`).

    The table's last rows line up with the stream's last tokens (N = `stream.shape[1]`, read at
    run time, or an int). A table with more than N rows has extra rows in front (e.g. text), all
    kept; one with fewer has no rows for the first tokens, which must be protected prefix tokens
    (e.g. timm's EVA applies rotary embeddings to the patch tokens only). Along dim 0 the table
    has no batch dim, so the route must use one index set for the whole batch (`ids[0]` is used).
    """
    if ids is None:
        return table
    n = stream if isinstance(stream, int) else stream.shape[1]
    off = table.shape[dim] - n
    head, ids = max(off, 0), ids[:, max(-off, 0):] + off  # (kept prefix ids are 0..protect-1)
    if dim == 0:
        return table.index_select(0, torch.cat([torch.arange(head, device=ids.device), ids[0]]))
    lead = torch.arange(head, device=ids.device).expand(ids.shape[0], head)
    return gather_tokens(table, torch.cat([lead, ids], dim=1), shared)


def _joined_ids(ids: torch.Tensor, p: int, n: int, s: int) -> torch.Tensor:
    """`ids` into n stream tokens as indices into [p other tokens, the n stream tokens, s others]."""
    b = ids.shape[0]
    parts = [torch.arange(p, device=ids.device).expand(b, p), ids + p,
             torch.arange(p + n, p + n + s, device=ids.device).expand(b, s)]
    return torch.cat(parts, dim=1)


def gather_joined(x: torch.Tensor, ids, p: int, s: int):
    """Kept tokens of a stream joined with p other tokens in front and s behind (text tokens are
    never routed: all of them are kept, in place)."""
    if ids is None:
        return x
    return x.gather(1, _token_index(_joined_ids(ids, p, x.shape[1] - p - s, s), x))


def scatter_joined(base: torch.Tensor, ids, kept: torch.Tensor, p: int, s: int, base_p: int = 0,
                   base_s: int = 0) -> torch.Tensor:
    """Route end for a stream that leaves the route joined with other tokens (p in front, s
    behind): the bypassed tokens get their route-start values from `base` (the stream itself, or
    joined as `base_p` / `base_s`), the other tokens and the kept ones come from `kept`."""
    if ids is None:
        return kept
    start = base[:, base_p: base.shape[1] - base_s]
    if start.dtype != kept.dtype:
        start = start.to(kept.dtype)
    if start.shape[0] != kept.shape[0]:
        start = start.expand(kept.shape[0], *start.shape[1:])
    full = torch.cat([kept[:, :p], start, kept[:, kept.shape[1] - s:]], dim=1)
    return full.scatter(1, _token_index(_joined_ids(ids, p, start.shape[1], s), kept), kept)


def scatter_tokens(base: torch.Tensor, ids, kept: torch.Tensor) -> torch.Tensor:
    """Out-of-place: `base` with its `ids` tokens replaced by `kept` (TREAD's route end)."""
    if ids is None:
        return kept
    if base.dtype != kept.dtype:
        base = base.to(kept.dtype)
    if base.shape[0] != kept.shape[0]:
        base = base.expand(kept.shape[0], *base.shape[1:])
    return base.scatter(1, _token_index(ids, kept), kept)


_CONVERT = {"int": int, "float": float, "bool": bool, "len": len, "tolist": lambda t: t.tolist(),
            "item": lambda t: t.item()}


@has_side_effect
def check_guard(value, kind: str, expected, where: str):
    """Fail loudly when a value that tracing turned into a Python constant changes (fake tensors,
    seen while routefx analyses the graph, have no values to check)."""
    if isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
        return value
    got = _CONVERT[kind](value)
    if got != expected:
        raise GuardError(f"{where}: traced with {kind}(...) = {expected!r}, now {got!r}. "
                         f"The model's code turned this value into a Python constant while "
                         f"tracing; routefx re-traces for new input shapes, but this value changed "
                         f"with the batch size. Pass `static_batch=True` to routefx.apply to "
                         f"re-trace per batch size.")
    return value


@has_side_effect
def check_assert(cond, where: str):
    """The model's `assert` / `torch._assert` on tensor values, kept as a run-time check (fake
    tensors, seen while routefx analyses the graph, are not checked)."""
    if not isinstance(cond, torch.Tensor):
        if not cond:
            raise AssertionError(f"the model's assertion failed at {where}")
        return
    if isinstance(cond, torch._subclasses.fake_tensor.FakeTensor):
        return
    if torch.compiler.is_compiling():
        torch._assert_async(cond.all(), f"the model's assertion failed at {where}")
    elif not bool(cond.all()):
        raise AssertionError(f"the model's assertion failed at {where}")


def setitem(x: torch.Tensor, key, value) -> torch.Tensor:
    """`x[key] = value` out of place (how capture records the model's in-place item assignment)."""
    out = x.clone()
    out[key] = value
    return out
