"""Training losses over image patches: plain MSE and TREAD's multi-route masked loss.

Patches are taken in the raster order of a ViT patch embedding (row by row, left to right), so
patch `n` of an image is token `n` of a DiT-style model and `RouteInfo.patch_mask[:, n]` says
whether it bypassed a route.

Example:
    >>> import torch
    >>> pred, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    >>> patch_errors(pred, target, patch_size=2).shape
    torch.Size([2, 4])
"""
import torch

__all__ = ["patchify", "unpatchify", "patch_errors", "plain_loss", "masked_route_loss",
           "standardize_patches"]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images to (B, N, C * p * p) patches in the model's token (raster) order."""
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; "
                         f"pass the model's patch size (e.g. model.patch_size).")
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C*p*p)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, height: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, C * p * p) back to (B, C, H, W)."""
    b, n, _ = patches.shape
    p, gh = patch_size, height // patch_size
    gw = n // gh
    x = patches.reshape(b, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, gh * p, gw * p)


def patch_errors(pred: torch.Tensor, target: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean squared error of each patch: (B, N), in token order."""
    return patchify((pred.float() - target.float()).square(), patch_size).mean(dim=-1)


def plain_loss(pred: torch.Tensor, target: torch.Tensor, weight=None) -> torch.Tensor:
    """MSE over every pixel (the current TREAD reference loss); `weight` is per sample (B,)."""
    err = (pred.float() - target.float()).square()
    if weight is None:
        return err.mean()
    return (err.flatten(1).mean(dim=1) * weight).mean()


def standardize_patches(x: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch of `x` shifted and scaled to zero mean and unit variance (an MAE target)."""
    p = patchify(x.float(), patch_size)
    p = (p - p.mean(dim=-1, keepdim=True)) / (p.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    return unpatchify(p, patch_size, x.shape[1], x.shape[2])


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_route_loss(pred, target, route_infos, patch_size, weight=None, mae_target=None,
                      mae_lambda=0.0) -> torch.Tensor:
    """TREAD's multi-route loss (TREAD.md section 2).

    With `m_r` the (B, N) patch mask of route `r` (1 = bypassed) and `e_p` the per-patch squared
    error, the loss is `mean_r mean_{m_r = 0} w * e_p` plus, when `mae_lambda > 0`,
    `mae_lambda * mean_r mean_{m_r = 1} ||pred_p - mae_target_p||^2`. A route that ran at ratio 0
    (or no route at all) counts every patch as processed.

    Args:
        pred, target: (B, C, H, W) model output and regression target.
        route_infos: `routed.routing` after the training forward (a list of `RouteInfo`).
        patch_size: the model's patch size (tokens are patches in raster order).
        weight: optional per-sample (B,) or per-patch (B, N) loss weight.
        mae_target: (B, C, H, W) target for bypassed patches (e.g. `standardize_patches(x_t)`).
        mae_lambda: weight of the bypassed-patch term; 0 (the default) disables it.
    Returns:
        A scalar tensor.

    Example:
        >>> loss = masked_route_loss(out, v, routed.routing, patch_size=2)   # doctest: +SKIP
    """
    err = patch_errors(pred, target, patch_size)  # (B, N)
    if weight is not None:
        err = err * (weight[:, None] if weight.dim() == 1 else weight)
    masks = [_bypass_mask(info, err) for info in route_infos] or [torch.zeros_like(err, dtype=torch.bool)]
    loss = torch.stack([_masked_mean(err, ~m) for m in masks]).mean()
    if mae_lambda:
        if mae_target is None:
            raise ValueError("mae_lambda > 0 needs mae_target (e.g. standardize_patches(x_noisy, p)).")
        mae = patch_errors(pred, mae_target, patch_size)
        loss = loss + mae_lambda * torch.stack([_masked_mean(mae, m) for m in masks]).mean()
    return loss


def _bypass_mask(info, err) -> torch.Tensor:
    if info.ids is None:  # route ran at ratio 0: nothing bypassed
        return torch.zeros_like(err, dtype=torch.bool)
    mask = info.patch_mask
    if mask.shape != err.shape:
        raise ValueError(f"route mask {tuple(mask.shape)} does not match the {tuple(err.shape)} "
                         f"patches of the output: check patch_size (tokens must be the image's "
                         f"patches in raster order).")
    return mask.to(err.device)
