"""FLOP counting shared by `routefx.inspect`, `routefx.bench` and every cost prediction.

`torch.utils.flop_counter.FlopCounterMode` has formulas for matmuls, convolutions and the CUDA
attention kernels, but none for the CPU kernel that `F.scaled_dot_product_attention` runs
(`aten._scaled_dot_product_flash_attention_for_cpu`, forward and backward): on a CPU it counts
attention as zero. `count_flops` counts it, on every device and dtype, and reports the ops with
real compute that it could not count.

What is counted (the convention of every figure routefx prints):

* **Model FLOPs.** A matmul is `2*m*n*k`. Attention is its matmul formulation: forward `QK^T`
  and `PV`, `2*b*h_q*S_q*S_k*(E + E_v)`; backward the four matmuls of their gradients, twice the
  forward. The score matrix is always counted in full (`S_q x S_k`), also for causal attention
  and masks, as torch's own attention formulas and the masked matmuls do. GQA counts the query
  heads (as the matmuls on repeated key/value heads would). The result is the same whichever
  SDPA kernel ran (CPU flash, CUDA flash / memory-efficient / cuDNN, the math decomposition).
  Unlike torch's CUDA formulas, the backward does *not* count the flash kernels' recomputation of
  `QK^T` (their work, not the model's): `count_flops` overrides those formulas.
* **Not counted, by FlopCounterMode's convention:** elementwise, reduction, normalisation,
  indexing and memory ops (`add`, `softmax`, `layer_norm`, `gather`, `copy_`, ...). They are not
  listed as missing.
* **Not counted, and reported** in `FlopCount.uncounted` (name -> calls): ops with real compute
  and no formula: custom (non-aten) ops such as mamba-ssm / causal-conv1d kernels, and aten
  matmul / convolution / attention / RNN / FFT / linalg ops without a formula (e.g. `addmm_`,
  `mv`, `_native_multi_head_attention`). mamba-ssm's CUDA path calls its extensions outside the
  dispatcher, so no op is seen at all: a `Mamba` module that runs with those kernels is reported
  by module. (On a CPU, routefx's pure-torch scan runs: its einsums are counted as `bmm`, its
  recurrence is elementwise.)

Importing this module (done by `import routefx`) also registers torch-convention formulas for the
CPU attention ops in torch's global registry, so that a plain `FlopCounterMode` counts CPU
attention as it counts CUDA attention (backward with the recomputation, as torch's CUDA formulas).
An op that already has a formula (a later torch) is left alone; importing twice changes nothing.

Example:
    >>> import torch, torch.nn.functional as F
    >>> q = k = v = torch.randn(2, 4, 16, 8)
    >>> fc = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    >>> fc.total == 2 * 2 * 4 * 16 * 16 * (8 + 8), fc.uncounted
    (True, {})
"""
import dataclasses
import re
import sys
from collections import Counter
from math import prod

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "count_flops", "uncounted_line", "attention_flops", "attention_backward_flops",
           "tread_flop_ratio", "ATTENTION_FORWARD", "ATTENTION_BACKWARD"]

aten = torch.ops.aten


def _ops(*names) -> tuple:
    """The aten op packets of `names` that this torch has."""
    return tuple(getattr(aten, n) for n in names if hasattr(aten, n))


# query, key, value are the first three arguments of each forward op, and follow grad_out in each
# backward op; all are (batch..., heads, S, E) with the key/value heads <= query heads
ATTENTION_FORWARD = _ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                         "_scaled_dot_product_fused_attention_overrideable",
                         "_scaled_dot_product_attention_math_for_mps")
ATTENTION_BACKWARD = _ops("_scaled_dot_product_flash_attention_for_cpu_backward",
                          "_scaled_dot_product_flash_attention_backward",
                          "_scaled_dot_product_efficient_attention_backward",
                          "_scaled_dot_product_cudnn_attention_backward",
                          "_scaled_dot_product_fused_attention_overrideable_backward")


# -- formulas -----------------------------------------------------------------------------------

def _scores(q_shape, k_shape, width: int) -> int:
    """One `S_q x S_k` attention matmul of inner size `width`, over the batch and query heads."""
    *batch, heads, s_q, _ = q_shape
    return 2 * prod(batch) * heads * s_q * k_shape[-2] * width


def attention_flops(q_shape, k_shape, v_shape) -> int:
    """Forward attention FLOPs: `QK^T` and `PV` in full, `2*b*h_q*S_q*S_k*(E + E_v)`."""
    return _scores(q_shape, k_shape, q_shape[-1] + v_shape[-1])


def attention_backward_flops(q_shape, k_shape, v_shape) -> int:
    """Backward attention FLOPs as four matmuls (dP, dV, dQ, dK): twice the forward, no recompute."""
    return 2 * attention_flops(q_shape, k_shape, v_shape)


def _fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(q, k, v)


def _bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(q, k, v)


def _bwd_torch(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    """Torch's convention for fused backward kernels: the four matmuls plus the `QK^T` recompute."""
    return attention_backward_flops(q, k, v) + _scores(q, k, q[-1])


def _register_cpu_formulas() -> list:
    """Torch-convention formulas for attention ops torch has none for; returns what was registered."""
    added = []
    for ops, formula in ((ATTENTION_FORWARD, _fwd), (ATTENTION_BACKWARD, _bwd_torch)):
        for op in ops:
            if op not in flop_counter.flop_registry:  # a later torch may have its own: keep it
                flop_counter.register_flop_formula(op)(formula)
                added.append(str(op))
    return added


REGISTERED = _register_cpu_formulas()
MODEL_FLOP_FORMULAS = {**{op: _fwd for op in ATTENTION_FORWARD}, **{op: _bwd for op in ATTENTION_BACKWARD}}


# -- what the counter cannot see -----------------------------------------------------------------

_COMPUTE = re.compile(r"attention|(^|_)(mm|bmm|addmm|baddbmm|addbmm|matmul|mv|addmv|dot|vdot|ger|outer|addr"
                      r"|bilinear)(_|$)|conv(olution)?(_|\d|$)|(^|_)(rnn|lstm|gru)(_|$)|(^|_)fft_|^linalg_")
_BUILTIN_NAMESPACES = {"aten", "prim", "prims"}


def _is_uncounted_compute(func) -> bool:
    if func.namespace not in _BUILTIN_NAMESPACES:
        return True  # a custom op: its FLOPs are unknown
    return func.namespace == "aten" and bool(_COMPUTE.search(func._overloadpacket.__name__))


class _Uncounted(TorchDispatchMode):
    """Below a FlopCounterMode: sees the ops it runs undecomposed and records those with no formula."""

    def __init__(self, registry):
        super().__init__()
        self.registry, self.calls = registry, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket not in self.registry and _is_uncounted_compute(func):
            self.calls[str(func._overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _opaque_modules() -> dict:
    """Module classes whose compute never reaches the dispatcher -> why: mamba-ssm's CUDA extensions."""
    loaded = getattr(sys.modules.get("routefx.mamba_compat"), "_loaded", None)
    if loaded is None or loaded.fallback:
        return {}
    return {loaded.mamba_simple.Mamba: "mamba_ssm Mamba (selective scan / causal conv1d CUDA kernels, "
                                       "not seen by the counter)"}


# -- the counter ---------------------------------------------------------------------------------

@dataclasses.dataclass
class FlopCount:
    """What `count_flops` counted: model FLOPs in total, per module and op, and what it could not count."""

    total: int
    per_module: dict  # module path ("DiT.blocks.0", "Global") -> op name ("aten.mm") -> FLOPs
    uncounted: dict  # op (or module) name -> calls, for compute with no formula

    @property
    def by_op(self) -> dict:
        """op name -> FLOPs over the whole call."""
        return self.per_module.get("Global", {})

    def uncounted_line(self) -> str:
        """See `uncounted_line`."""
        return uncounted_line(self.uncounted)


def uncounted_line(uncounted: dict) -> str:
    """`"N ops not counted: name (calls), ..."`, or a line saying every op with compute was counted."""
    if not uncounted:
        return "all ops with compute counted (elementwise and memory ops are not, by convention)"
    ops = ", ".join(f"{k} ({v} calls)" for k, v in sorted(uncounted.items()))
    return f"{len(uncounted)} ops not counted: {ops}"


def count_flops(fn) -> FlopCount:
    """Count the model FLOPs of `fn()` (forward, and backward if it runs one), attention included.

    Compiled code runs eagerly inside (`torch.compiler.set_stance("force_eager")`) so that every op
    is seen. Conventions: see the module docstring.

    Args:
        fn: a callable of no arguments, e.g. `lambda: model(x).square().mean().backward()`.
    Returns:
        `FlopCount(total, per_module, uncounted)`.

    Example:
        >>> lin = torch.nn.Linear(8, 4)
        >>> count_flops(lambda: lin(torch.randn(3, 8))).total  # 2 * 3 * 8 * 4
        192
    """
    counter = FlopCounterMode(display=False, custom_mapping=MODEL_FLOP_FORMULAS)
    uncounted, opaque, kinds = _Uncounted(counter.flop_registry), Counter(), _opaque_modules()

    def hook(module, args):
        for kind, reason in kinds.items():
            opaque[reason] += isinstance(module, kind)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook) if kinds else None
    try:
        with torch.compiler.set_stance("force_eager"), uncounted, counter:
            fn()
    finally:
        if handle is not None:
            handle.remove()
    per_module = {m: {str(op): n for op, n in ops.items()} for m, ops in counter.get_flop_counts().items()}
    return FlopCount(counter.get_total_flops(), per_module, {**uncounted.calls, **+opaque})  # +: drop zero counts


# -- prediction ----------------------------------------------------------------------------------

def tread_flop_ratio(num_blocks: int, routes, num_tokens: int, dim: int, protect: int = 0) -> float:
    """TREAD.md section 6 with attention: routed/dense FLOPs of a chain of transformer blocks.

    A block that sees `n` tokens costs `n * (24 d^2 + 4 n d)` (linear layers, attention); blocks
    inside a route see its kept tokens, `protect + M - int(M * ratio)` with `M = N - protect`
    routable tokens. The same ratio holds for forward and fwd+bwd (backward is twice the forward
    for both terms). Costs outside the blocks are left out.

    Args:
        num_blocks: blocks in the chain. routes: `Route`s or `(start, end, ratio)` tuples.
        num_tokens: tokens `N` a dense block sees. dim: hidden size `d`.
        protect: prefix tokens never routed.

    Example:
        >>> round(tread_flop_ratio(12, [(2, 8, 0.5)], 1024, 384), 4)
        0.6635
    """
    seen, routable = [num_tokens] * num_blocks, num_tokens - protect
    for r in routes:
        start, end, ratio = (r.start, r.end, r.ratio) if hasattr(r, "start") else r
        for i in range(start % num_blocks, end % num_blocks + 1):
            seen[i] = num_tokens - int(routable * ratio)
    block = lambda n: n * (24 * dim * dim + 4 * n * dim)  # noqa: E731
    return sum(block(n) for n in seen) / (num_blocks * block(num_tokens))
