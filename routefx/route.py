"""`Route`: one TREAD route `(start, end, ratio)` over a backbone's block chain."""
import dataclasses
import math
import numbers

from .errors import INSPECT_HINT, RouteError

__all__ = ["Route", "as_routes", "resolve_routes", "paper_route"]


@dataclasses.dataclass(frozen=True)
class Route:
    """Tokens bypass blocks `start..end` (inclusive) with probability `ratio` per token.

    `start` / `end` index the block chain and may be negative (counted from the end, as in
    Python). `ratio` is TREAD's selection rate: `int(N * ratio)` of the `N` routable tokens
    of every sample skip the span and re-enter unchanged after block `end`.

    Example:
        >>> Route(2, -5, 0.5).resolve(28)
        Route(start=2, end=23, ratio=0.5)
    """

    start: int
    end: int
    ratio: float = 0.5

    def __post_init__(self):
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise RouteError(f"Route {name} must be an int block index, got {v!r}. "
                                 f"Write e.g. Route(2, 8, 0.5).")
            object.__setattr__(self, name, int(v))
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r):
            raise RouteError(f"Route ratio must be a finite number in [0, 1), got {r!r}. "
                             f"TREAD uses 0.5.")
        if not 0.0 <= float(r) < 1.0:
            raise RouteError(f"Route ratio {r} is outside [0, 1): it is the fraction of tokens "
                             f"that bypass the route; use e.g. 0.5 (ratio 1 would route every token).")
        object.__setattr__(self, "ratio", float(r))

    def resolve(self, num_blocks: int) -> "Route":
        """Return this route with non-negative indices checked against `num_blocks`."""
        s = self.start + num_blocks if self.start < 0 else self.start
        e = self.end + num_blocks if self.end < 0 else self.end
        for name, v, raw in (("start", s, self.start), ("end", e, self.end)):
            if not 0 <= v < num_blocks:
                raise RouteError(f"Route {name}={raw} is out of range for a chain of {num_blocks} "
                                 f"blocks (valid: {-num_blocks}..{num_blocks - 1}). {INSPECT_HINT}")
        if s > e:
            raise RouteError(f"Route start {self.start} comes after its end {self.end} "
                             f"(blocks {s} > {e}); write Route({e}, {s}, {self.ratio}) if you "
                             f"meant that span.")
        return Route(s, e, self.ratio)

    def num_kept(self, num_tokens: int) -> int:
        """Tokens that go through the span: `N - int(N * ratio)`."""
        return num_tokens - int(num_tokens * self.ratio)


def as_routes(routes) -> list:
    """Turn tuples / Routes / a single route into a list of `Route` (indices unresolved)."""
    if isinstance(routes, (Route, tuple)) and len(routes) == 3 and not isinstance(routes[0], (tuple, list, Route)):
        routes = [routes]
    if not isinstance(routes, (list, tuple)):
        raise RouteError(f"routes must be a list of (start, end, ratio) tuples, got {type(routes).__name__}. "
                         f"Write routes=[(2, 8, 0.5)].")
    out = []
    for r in routes:
        if isinstance(r, Route):
            out.append(r)
        elif isinstance(r, (tuple, list)) and len(r) == 3:
            out.append(Route(*r))
        elif isinstance(r, dict):
            out.append(Route(**r))
        else:
            raise RouteError(f"Each route must be (start, end, ratio) or a Route, got {r!r}. "
                             f"Write routes=[(2, 8, 0.5)].")
    return out


def resolve_routes(routes, num_blocks: int) -> list:
    """Resolve indices and reject overlapping routes; returns routes sorted by start."""
    resolved = sorted((r.resolve(num_blocks) for r in as_routes(routes)), key=lambda r: r.start)
    for a, b in zip(resolved, resolved[1:]):
        if b.start <= a.end:
            raise RouteError(f"Routes {a} and {b} overlap (blocks {b.start}..{min(a.end, b.end)} are in "
                             f"both). Routes run one after another: make each start after the previous "
                             f"ends, e.g. ({a.start}, {a.end}, {a.ratio}) and ({a.end + 1}, {max(b.end, a.end + 1)}, {b.ratio}).")
    return resolved


def paper_route(depth: int, ratio: float = 0.5) -> Route:
    """TREAD's rule: start at block 2, end at block depth-4; short chains keep >= 2 blocks
    routed and >= 2 blocks after the route where they can ("very short routes hurt").

    Example:
        >>> paper_route(12), paper_route(8), paper_route(6)
        (Route(start=2, end=8, ratio=0.5), Route(start=2, end=4, ratio=0.5), Route(start=2, end=3, ratio=0.5))
    """
    start = min(2, max(depth - 2, 0))
    return Route(start, max(start, depth - 4, min(start + 1, depth - 3)), ratio)
