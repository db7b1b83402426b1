"""Errors raised by routefx. Every message ends with the fix."""

__all__ = ["RouteError", "CaptureError", "GuardError", "INSPECT_HINT"]

INSPECT_HINT = "Run `python -m routefx.inspect your_model.py` to see the blocks and tensors routefx found."


class RouteError(ValueError):
    """A route or a model that routefx cannot route as asked."""


class CaptureError(RouteError):
    """The model could not be captured into a graph."""


class GuardError(RuntimeError):
    """A value fixed while tracing differs at run time."""
