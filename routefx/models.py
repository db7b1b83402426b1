"""Backbones for training: registry names or the small default DiT, plus what a trainer needs.

`build(config)` makes a plain backbone from a JSON-able config (the one stored in every
checkpoint), and `describe(model)` says how to drive it: patch size, block-chain length,
null class for classifier-free guidance, and whether the model drops labels itself.

Example:
    >>> cfg = backbone_config("DiT-mini", image_size=28, channels=1, num_classes=10)
    >>> model = build(cfg)
    >>> describe(model).patch_size, describe(model).depth
    (4, 6)
"""
import dataclasses

from torch import nn

from .backbones import UViT, create, names
from .backbones.dit import DiT
from .route import paper_route  # noqa: F401 - re-exported for the trainer

__all__ = ["MINI", "ModelInfo", "backbone_config", "build", "describe", "paper_route"]

# The default: a DiT small enough to train on 2 CPU cores in ~10 minutes on 28x28 MNIST.
# Patch 4 -> 7x7 = 49 tokens (attention stays cheap), 6 blocks of width 128.
MINI = dict(patch_size=4, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0, learn_sigma=False)


@dataclasses.dataclass
class ModelInfo:
    """How a trainer drives a backbone."""

    family: str        # "dit" (DiT/SiT), "uvit" or "dim"
    patch_size: int
    depth: int         # length of the block chain routes index
    null_class: int    # label meaning "no class" (classifier-free guidance)
    drops_labels: bool  # True: the model replaces labels by null_class itself in train mode


def _family(name: str) -> str:
    if name.startswith(("DiT", "SiT")):
        return "dit"
    if name.startswith("U-ViT"):
        return "uvit"
    if name.startswith("DiM"):
        return "dim"
    raise ValueError(f"unknown backbone {name!r}; valid names: DiT-mini, {', '.join(names())}")


def backbone_config(name: str, image_size: int, channels: int, num_classes: int,
                    label_dropout: float = 0.1, **overrides) -> dict:
    """A JSON-able description of a backbone for these images (stored in checkpoints).

    `name` is "DiT-mini" (the default small DiT, see `MINI`) or any `routefx.backbones` name;
    `overrides` are constructor keyword arguments (e.g. hidden_size=96 for DiT-mini).
    """
    family = _family(name)
    if family == "dit":
        kw = dict(input_size=image_size, in_channels=channels, num_classes=num_classes,
                  class_dropout_prob=label_dropout)
    elif family == "uvit":  # the last label is the null class, as in U-ViT's ImageNet models
        kw = _uvit_kwargs(name, dict(img_size=image_size, in_chans=channels, num_classes=num_classes + 1))
    else:
        kw = dict(img_size=image_size, in_channels=channels, num_classes=num_classes)
    if name == "DiT-mini":
        kw = {**MINI, **kw}
    return {"name": name, "kwargs": {**kw, **overrides}, "num_classes": num_classes,
            "channels": channels, "image_size": image_size, "label_dropout": label_dropout}


def _uvit_kwargs(name: str, data_kw: dict) -> dict:
    """Full `UViT(...)` arguments of a registry size with this data's image size and channels.

    The registry's U-ViT factories fix some of these (U-ViT-T/2 fixes in_chans=4, S/2 and M/2
    fix img_size=32), so the size is read off a default instance and `UViT` is built directly.
    """
    ref = create(name)
    blk = ref.in_blocks[0]
    dim = ref.pos_embed.shape[-1]
    return dict(patch_size=ref.patch_embed.patch_size, embed_dim=dim, depth=2 * len(ref.in_blocks) + 1,
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / dim,
                qkv_bias=blk.attn.qkv.bias is not None, mlp_time_embed=isinstance(ref.time_embed, nn.Sequential),
                conv=isinstance(ref.final_layer, nn.Conv2d), **data_kw)


def build(config: dict) -> nn.Module:
    """The plain (unrouted) backbone described by `backbone_config(...)`."""
    name, kw = config["name"], config["kwargs"]
    if name == "DiT-mini":
        return DiT(**kw)
    if _family(name) == "uvit":
        return UViT(**kw)
    try:
        return create(name, **kw)
    except TypeError as e:
        if "multiple values" not in str(e):
            raise
        raise ValueError(f"{name}: {e}. The registry size fixes that argument; --hidden / --depth / "
                         f"--heads / --patch apply to DiT-mini (or pick another size).") from e


def describe(model: nn.Module, num_classes: int = None) -> ModelInfo:
    """Patch size, chain length, null class and label-dropout owner of a built backbone."""
    if isinstance(model, DiT):
        drops = model.y_embedder.dropout_prob > 0
        return ModelInfo("dit", model.patch_size, len(model.blocks), model.num_classes, drops)
    if hasattr(model, "in_blocks"):  # U-ViT
        depth = len(model.in_blocks) + 1 + len(model.out_blocks)
        return ModelInfo("uvit", model.patch_embed.patch_size, depth, model.num_classes - 1, False)
    if hasattr(model, "layers"):  # DiM
        return ModelInfo("dim", model.patch_size, len(model.layers), model.num_classes, False)
    raise ValueError(f"{type(model).__name__}: not a DiT, U-ViT or DiM backbone")
