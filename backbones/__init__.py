"""Reference backbones, registered by name.

DiT, SiT and U-ViT are always available; the DiM (Mamba) sizes import `routefx.backbones.mamba`
(and the `mamba-ssm` it needs) when first built.

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
_MAMBA_NAMES = ("DiM-T/2", "DiM-S/2", "DiM-B/2")  # checked against mamba.Mamba_models by the tests


def _mamba_factory(name: str) -> Callable[..., nn.Module]:
    """Importing mamba-ssm takes 10-20 s: only models that need it pay for it, on first use."""
    def factory(**kwargs):
        try:
            from routefx.backbones import mamba
        except ImportError as e:
            raise ImportError(f"{name} needs mamba-ssm: {e}. Install it with `pip install routefx[mamba]` "
                              f"(on a machine without CUDA see docs/install.md for the build flags).") from e
        if mamba not in _MODULES:
            _MODULES.append(mamba)
        return mamba.Mamba_models[name](**kwargs)
    factory.__name__ = name
    return factory


Mamba_models: dict[str, Callable[..., nn.Module]] = {n: _mamba_factory(n) for n in _MAMBA_NAMES}

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
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(names())}")
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

