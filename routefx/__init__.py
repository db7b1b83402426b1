"""routefx: TREAD token routing for any diffusion backbone, as a torch.fx graph pass.

    >>> import routefx
    >>> routed = routefx.apply(model, routes=[(2, 8, 0.5)])   # doctest: +SKIP

`apply` / `remove` are the front door; `python -m routefx.inspect model.py` is its twin.
"""
from . import flops  # noqa: F401 - registers the CPU attention FLOP formulas torch lacks
from .api import RouteInfo, Router, apply, force_routing, remove, router, unrouted
from .errors import CaptureError, GuardError, RouteError
from .route import Route

__all__ = ["apply", "remove", "force_routing", "Route", "RouteInfo", "Router", "router", "unrouted", "RouteError",
           "CaptureError", "GuardError"]
__version__ = "0.1.0"
