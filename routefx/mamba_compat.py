"""Run mamba-ssm's own `Mamba` and `Block` modules on machines without its CUDA kernels.

Why this exists: mamba-ssm is written for CUDA. On a CPU machine (a laptop, CI) it has three
problems, all fixed here without copying or subclassing any mamba-ssm module:

1. `mamba_ssm.ops.selective_scan_interface` does an unguarded `import selective_scan_cuda`, the
   compiled extension that is missing when mamba-ssm was installed without CUDA. `load_mamba`
   registers an empty placeholder module under that name, only if the real one cannot be imported.
2. `Mamba.forward` calls that extension's scan. `load_mamba` points the `selective_scan_fn` name
   that `mamba_ssm.modules.mamba_simple` imported at `selective_scan_torch`, a pure-torch scan
   with the same signature and results as mamba-ssm's `selective_scan_ref`, whose backward is
   linear in the sequence length (the reference one is quadratic: 20+ s at L=256). It also sets
   that module's `causal_conv1d_fn` to None, the very condition under which `Mamba.forward` skips
   its fused CUDA path (`mamba_inner_fn`) for the non-fused one (`nn.Conv1d` + scan), and sets
   `causal_conv1d_update` / `selective_state_update` to None so that `Mamba.step` (decoding)
   runs in torch too.
3. `import mamba_ssm` takes 5-20 s because the package `__init__` loads Mamba2, Mamba3, tilelang
   and cute kernels. `load_mamba` imports only `mamba_ssm.modules.mamba_simple` and
   `mamba_ssm.modules.block` (about 0.1 s); the rest of the package `__init__` runs the first
   time any other `mamba_ssm.<name>` attribute is asked for, so `from mamba_ssm import Mamba2`
   still works.

On a CUDA machine whose compiled kernels import, `load_mamba` does nothing but a plain
`import mamba_ssm`: the real kernels run untouched. Note that such a process then runs `Mamba`
only on CUDA tensors (mamba-ssm's own behaviour).

Install mamba-ssm without CUDA (it ships only as an sdist; without MAMBA_FORCE_BUILD its setup
tries to download a prebuilt CUDA wheel and fails)::

    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \\
        pip install --no-build-isolation mamba-ssm==2.3.2.post1
"""
import importlib
import importlib.util
import sys
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

__all__ = ["INSTALL_COMMAND", "MambaModules", "load_mamba", "selective_scan_torch"]

INSTALL_COMMAND = ("MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "
                   "pip install --no-build-isolation mamba-ssm==2.3.2.post1")
_KERNEL = "selective_scan_cuda"


class MambaModules(NamedTuple):
    """What `load_mamba` returns: mamba-ssm's modules and whether the torch fallback is on."""
    mamba_simple: types.ModuleType  # holds `Mamba`
    block: types.ModuleType  # holds `Block`
    fallback: bool  # True: pure-torch scan; False: mamba-ssm's CUDA kernels, untouched


_loaded: Optional[MambaModules] = None


# --------------------------------------------------------------------------------------------
#                                   Pure-torch selective scan
# --------------------------------------------------------------------------------------------

def _input_matrix(M: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """B or C as `(D, N)` (fixed), `(batch, N, L)` or `(batch, D, N, L)` (groups expanded)."""
    if M.dim() == 2:
        return M if A.is_complex() else M.float()
    M = M.float()
    if A.is_complex():  # real pairs along the last axis hold the complex values
        M = torch.view_as_complex(rearrange(M, "... (l two) -> ... l two", two=2).contiguous())
    if M.dim() == 4:
        M = repeat(M, "b g n l -> b (g h) n l", h=A.shape[0] // M.shape[1])
    return M


def _drive(delta, u, B):
    """Input term `delta * B * u` of every step, `(L, batch, D, N)`."""
    lhs = {2: "dn", 3: "bnl", 4: "bdnl"}[B.dim()]
    return torch.einsum(f"bdl,{lhs},bdl->lbdn", delta, B, u)


def _readouts(C, length):
    """Einsum equation and per-step C for `y_t = C_t . state_t`."""
    if C.dim() == 2:
        return "bdn,dn->bd", [C] * length
    return ("bdn,bn->bd" if C.dim() == 3 else "bdn,bdn->bd"), C.unbind(-1)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False):
    """Selective scan in plain torch: same signature and results as mamba-ssm's `selective_scan_fn`.

    Runs on any device and dtype. The recurrence is a Python loop over the `unbind`-ed time
    steps, so autograd's backward costs O(L), unlike `selective_scan_ref` that slices big tensors
    step by step (O(L^2) backward). Unlike `selective_scan_fn`, gradients also flow from
    `last_state`.

    Args:
        u, delta: `(batch, D, L)` inputs and step sizes.
        A: `(D, N)` state matrix, real or complex.
        B, C: `(D, N)` fixed, or `(batch, N, L)` / `(batch, G, N, L)` input-dependent (for a
            complex `A`, input-dependent B and C hold real pairs: last dim `2L`).
        D: `(D,)` skip weight. z: `(batch, D, L)` gate, the output is multiplied by `silu(z)`.
        delta_bias: `(D,)` added to delta. delta_softplus: apply softplus to delta.
        return_last_state: also return the final state `(batch, D, N)`.

    Returns:
        `out` `(batch, D, L)` in u's dtype, or `(out, last_state)`.

    Example:
        >>> u, delta, z = torch.randn(2, 4, 8), torch.rand(2, 4, 8), torch.randn(2, 4, 8)
        >>> A, B, C = -torch.rand(4, 3), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        >>> selective_scan_torch(u, delta, A, B, C, D=torch.ones(4), z=z).shape
        torch.Size([2, 4, 8])
    """
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A))  # (L, batch, D, N)
    drive = _drive(delta, u, _input_matrix(B, A))  # (L, batch, D, N)
    equation, readouts = _readouts(_input_matrix(C, A), u.shape[-1])
    state = A.new_zeros((u.shape[0], A.shape[0], A.shape[1]))  # (batch, D, N)
    ys = []
    for decay_t, drive_t, c_t in zip(decay.unbind(0), drive.unbind(0), readouts):
        state = decay_t * state + drive_t  # (batch, D, N)
        ys.append(torch.einsum(equation, state, c_t))  # (batch, D)
    y = torch.stack(ys, dim=-1)  # (batch, D, L)
    if y.is_complex():
        y = y.real * 2
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype_in)
    return (out, state) if return_last_state else out


# --------------------------------------------------------------------------------------------
#                                       Loading mamba-ssm
# --------------------------------------------------------------------------------------------

def _placeholder_getattr(name):
    raise AttributeError(
        f"selective_scan_cuda.{name}: this is routefx's empty placeholder, mamba-ssm was built "
        "without its CUDA kernels. Call routefx.mamba_compat.selective_scan_torch instead.")


def _install_kernel_placeholder() -> None:
    shim = types.ModuleType(_KERNEL, "Empty stand-in registered by routefx.mamba_compat.")
    shim.__getattr__ = _placeholder_getattr
    shim.__routefx_placeholder__ = True
    sys.modules[_KERNEL] = shim


def _kernel_importable() -> bool:
    if getattr(sys.modules.get(_KERNEL), "__routefx_placeholder__", False):
        return False
    try:
        importlib.import_module(_KERNEL)
    except ImportError:  # also undefined-symbol / missing libcudart errors
        return False
    return True


def _lazy_package(spec) -> types.ModuleType:
    """`mamba_ssm` as a package whose `__init__` only runs on first use of one of its names."""
    pkg = importlib.util.module_from_spec(spec)

    def __getattr__(name):
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)  # introspection probes do not trigger the slow import
        del pkg.__getattr__
        spec.loader.exec_module(pkg)  # the real `mamba_ssm/__init__.py`, into this module
        try:
            return pkg.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'mamba_ssm' has no attribute {name!r}") from None

    pkg.__getattr__ = __getattr__
    return pkg


def _import_light():
    """Import `mamba_simple` and `block` without running the heavy package `__init__`."""
    if "mamba_ssm" not in sys.modules:
        sys.modules["mamba_ssm"] = _lazy_package(importlib.util.find_spec("mamba_ssm"))
        try:
            return _import_submodules()
        except BaseException:
            sys.modules.pop("mamba_ssm", None)
            raise
    return _import_submodules()


def _import_submodules():
    return (importlib.import_module("mamba_ssm.modules.mamba_simple"),
            importlib.import_module("mamba_ssm.modules.block"))


def _use_torch_path(mamba_simple: types.ModuleType) -> None:
    mamba_simple.selective_scan_fn = selective_scan_torch
    mamba_simple.causal_conv1d_fn = None  # `Mamba.forward` then skips its fused CUDA path
    mamba_simple.causal_conv1d_update = None  # `Mamba.step` in torch too
    mamba_simple.selective_state_update = None


def load_mamba() -> MambaModules:
    """Import mamba-ssm's `Mamba` / `Block` modules, runnable on this machine. Idempotent.

    With CUDA and mamba-ssm's compiled kernels importable: a plain import, nothing patched.
    Otherwise: registers a `selective_scan_cuda` placeholder (only if the real one is missing),
    imports `mamba_ssm.modules.mamba_simple` and `mamba_ssm.modules.block`, and makes
    `Mamba.forward` take its non-fused path with `selective_scan_torch` as the scan.

    Returns:
        `MambaModules(mamba_simple, block, fallback)`.

    Raises:
        ImportError: mamba-ssm is not installed; the message gives the install command.

    Example:
        >>> ssm = load_mamba()
        >>> layer = ssm.block.Block(16, mixer_cls=ssm.mamba_simple.Mamba, mlp_cls=torch.nn.Identity)
        >>> hidden, residual = layer(torch.randn(1, 5, 16), None)
        >>> hidden.shape
        torch.Size([1, 5, 16])
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if importlib.util.find_spec("mamba_ssm") is None:
        raise ImportError("routefx's Mamba backbone needs mamba-ssm. On a machine without CUDA "
                          f"install it with:\n    {INSTALL_COMMAND}")
    kernel = _kernel_importable()
    if kernel and torch.cuda.is_available():
        importlib.import_module("mamba_ssm")
        _loaded = MambaModules(*_import_submodules(), fallback=False)
        return _loaded
    if not kernel:
        _install_kernel_placeholder()
    mamba_simple, block = _import_light()
    _use_torch_path(mamba_simple)
    _loaded = MambaModules(mamba_simple, block, fallback=True)
    return _loaded
