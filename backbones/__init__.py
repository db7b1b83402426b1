"""Reference backbones, registered by name.

DiT, SiT and U-ViT are always available; Mamba sizes join the registry when
`routefx.backbones.mamba` (and the `mamba-ssm` it needs) imports.

Example:
    >>> from routefx import backbones
    >>> model = backbones.create("DiT-T/2", input_size=8)
    >>> model(*backbones.example_inputs(model, batch=2)).shape
    torch.Size([2, 8, 8, 8])
"""

from typing import Callable

import torch.nn as nn

from routefx.backbones import dit, uvit
from routefx.backbones.dit import DiT, DiT_models, SiT_models
from routefx.backbones.uvit import UViT, UViT_models

__all__ = [
    "MODELS", "create", "names", "example_inputs",
    "DiT", "UViT", "DiT_models", "SiT_models", "UViT_models", "Mamba_models",
]

_MODULES = [dit, uvit]

try:
    from routefx.backbones import mamba
except ImportError as e:  # no mamba.py yet, or no mamba-ssm installed
    _MAMBA_IMPORT_ERROR: ImportError | None = e
    Mamba_models: dict[str, Callable[..., nn.Module]] = {}
else:
    _MAMBA_IMPORT_ERROR = None
    Mamba_models = mamba.Mamba_models
    _MODULES.append(mamba)

MODELS: dict[str, Callable[..., nn.Module]] = {
    **DiT_models, **SiT_models, **UViT_models, **Mamba_models,
}


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def create(name: str, **kwargs) -> nn.Module:
    """Builds a registered backbone by name.

    Args:
        name: a registry name, e.g. "DiT-XL/2", "SiT-B/2" or "U-ViT-S/2"; see `names()`.
        **kwargs: constructor overrides passed to the size's factory.

    Returns:
        The freshly initialised module.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.

    Example:
        >>> create("U-ViT-T/2").extras
        2
    """
    if name not in MODELS:
        hint = ""
        if name.lower().startswith("mamba") and _MAMBA_IMPORT_ERROR is not None:
            hint = f" (Mamba models are unavailable: {_MAMBA_IMPORT_ERROR})"
        raise ValueError(f"unknown backbone {name!r}{hint}; valid names: {', '.join(names())}")
    return MODELS[name](**kwargs)


def example_inputs(model: nn.Module, batch: int = 2) -> tuple:
    """Example forward inputs for a registered backbone, from its module's own helper.

    Args:
        model: a module built by `create` (or a subclass of a registered model class).
        batch: the batch size of the inputs.

    Returns:
        The positional arguments for `model(...)`, e.g. `(x, t, y)` for DiT.

    Example:
        >>> x, t, y = example_inputs(create("SiT-T/2", input_size=8), batch=3)
        >>> tuple(x.shape)
        (3, 4, 8, 8)
    """
    modules = {m.__name__: m for m in _MODULES}
    for cls in type(model).__mro__:
        module = modules.get(cls.__module__)
        if module is not None and hasattr(module, "example_inputs"):
            return module.example_inputs(model, batch=batch)
    raise TypeError(f"no example inputs for {type(model).__name__}: not a registered backbone "
                    f"class; known modules: {sorted(modules)}")

