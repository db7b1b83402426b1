"""`routefx.flops`: attention counted on the CPU like its matmul formulation; what is not counted is reported."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import routefx
from routefx import flops
from routefx.backbones import create, example_inputs
from routefx.flops import attention_flops, count_flops, tread_flop_ratio
from routefx.inspect import inspect_model

CPU_FWD = "aten._scaled_dot_product_flash_attention_for_cpu"
CPU_BWD = "aten._scaled_dot_product_flash_attention_for_cpu_backward"


def _matmul_attention(q, k, v, mask=None, causal=False):
    """SDPA written out: the reference the counter must agree with."""
    if k.shape[-3] != q.shape[-3]:  # GQA: every key/value head serves a group of query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, Sq, Sk)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


def _qkv(b, hq, hk, sq, sk, e, ev, dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(b, hq, sq, e), make(b, hk, sk, e), make(b, hk, sk, ev)


def _fwd_and_step(fn, q, k, v):
    fwd = count_flops(lambda: fn(q, k, v))
    step = count_flops(lambda: fn(q, k, v).float().sum().backward())
    return fwd, step


SHAPES = [  # b, hq, hk, sq, sk, e, ev
    (2, 4, 4, 16, 16, 8, 8), (1, 6, 6, 33, 33, 64, 64), (3, 2, 2, 7, 19, 16, 16), (2, 3, 3, 12, 12, 8, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masking", ["none", "causal", "float_mask", "bool_mask"])
def test_sdpa_counts_like_its_matmul_formulation(dtype, shape, masking):
    b, hq, hk, sq, sk, e, ev = shape
    q, k, v = _qkv(*shape, dtype)
    mask = {"float_mask": torch.randn(sq, sk, dtype=dtype),
            "bool_mask": torch.rand(b, 1, sq, sk) > 0.3}.get(masking)
    causal = masking == "causal"
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # noqa: E731
    ref = lambda q, k, v: _matmul_attention(q, k, v, mask, causal)  # noqa: E731
    (fwd, step), (ref_fwd, ref_step) = _fwd_and_step(sdpa, q, k, v), _fwd_and_step(ref, q, k, v)
    assert fwd.total == ref_fwd.total == attention_flops(q.shape, k.shape, v.shape)  # full Sq x Sk, masked or not
    assert step.total == ref_step.total == 3 * fwd.total
    if e == ev:  # the fused CPU kernel ran (E != E_v takes the math path, which is plain bmm)
        assert step.by_op == {CPU_FWD: fwd.total, CPU_BWD: 2 * fwd.total}
    assert fwd.uncounted == step.uncounted == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 16, 16, 8, 8), (1, 6, 3, 9, 20, 16, 16)])
def test_gqa_counts_the_query_heads(dtype, shape):
    b, hq, hk, sq, sk, e, ev = shape
    q, k, v = _qkv(*shape, dtype)
    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except TypeError:
        pytest.skip("this torch has no enable_gqa")
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    (fwd, step), (ref_fwd, ref_step) = _fwd_and_step(sdpa, q, k, v), _fwd_and_step(_matmul_attention, q, k, v)
    assert (fwd.total, step.total) == (ref_fwd.total, ref_step.total)
    assert CPU_FWD in fwd.by_op and fwd.total == attention_flops(q.shape, (b, hq, sk, e), (b, hq, sk, ev))


def test_every_kernel_counts_the_same():
    q, k, v = _qkv(2, 4, 4, 32, 32, 16, 16, torch.float32)
    step = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()  # noqa: E731
    fused = count_flops(step)
    with sdpa_kernel(SDPBackend.MATH):
        math = count_flops(step)
    assert fused.total == math.total and set(math.by_op) == {"aten.bmm"}


def test_plain_flop_counter_counts_cpu_attention_with_torchs_convention():
    # import routefx registered formulas torch lacks: a plain FlopCounterMode now counts CPU
    # attention, with the backward of torch's CUDA formulas (the four matmuls + the QK^T recompute)
    q, k, v = _qkv(2, 4, 4, 16, 24, 8, 8, torch.float32)
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    counts = fc.get_flop_counts()["Global"]
    fwd = attention_flops(q.shape, k.shape, v.shape)
    assert counts[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] == fwd
    torch_bwd = flop_counter.flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward]
    assert counts[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] == torch_bwd(
        q.grad, q, k, v) == 2 * fwd + fwd // 2


def test_registration_is_idempotent_and_keeps_existing_formulas(monkeypatch):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    before = dict(flop_counter.flop_registry)
    assert op in before and flops._register_cpu_formulas() == []  # already there: nothing added
    assert flop_counter.flop_registry == before
    mine = lambda *a, **kw: 7  # noqa: E731 - a later torch's own formula
    monkeypatch.setitem(flop_counter.flop_registry, op, mine)
    flops._register_cpu_formulas()
    assert flop_counter.flop_registry[op] is mine


def test_elementwise_is_not_reported_custom_ops_and_unformulated_matmuls_are():
    x, w = torch.randn(8, 8), torch.randn(8)
    assert count_flops(lambda: (x.exp() + x).softmax(-1).sum()).uncounted == {}

    @torch.library.custom_op("routefx_test::mix", mutates_args=())
    def mix(a: torch.Tensor) -> torch.Tensor:
        return a @ a

    fc = count_flops(lambda: (mix(x), torch.mv(x, w), x.clone().addmm_(x, x), x @ x))
    assert fc.uncounted == {"routefx_test.mix": 1, "aten.mv": 1, "aten.addmm_": 1}
    assert fc.total == 2 * 8 * 8 * 8  # only x @ x
    assert fc.uncounted_line().startswith("3 ops not counted: aten.addmm_ (1 calls)")


def test_compiled_code_is_counted_eagerly():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    compiled = torch.compile(lambda x: lin(x), backend="eager")
    assert count_flops(lambda: compiled(x)).total == count_flops(lambda: lin(x)).total == 2 * 4 * 16 * 16


def _dit_forward_flops(n, d, depth, patch=2, c_in=4, c_out=8, freq=256):
    """DiT's forward FLOPs written out by hand (TREAD.md section 6 per block, plus the rest)."""
    block = n * (24 * d * d + 4 * n * d) + 2 * d * 6 * d  # linears + attention per token; adaLN per sample
    embed = 2 * n * (patch * patch * c_in) * d + 2 * (freq * d + d * d)  # patch conv, timestep MLP
    final = 2 * d * 2 * d + 2 * n * d * patch * patch * c_out  # adaLN, linear head
    return depth * block + embed + final


def test_inspect_at_1024_tokens_counts_attention(one_thread):
    # DiT-S/2 at 64x64 latents: attention is a third of the FLOPs, which FlopCounterMode alone
    # counted as zero on a CPU (87.1 vs 125.7 GFLOP at batch 2)
    torch.manual_seed(0)
    model = create("DiT-S/2", input_size=64)
    args = example_inputs(model, 1)
    rep = inspect_model(model, args, {}, [routefx.Route(2, 8, 0.5)])
    assert rep["tokens"]["num_tokens"] == 1024 and rep["uncounted"] == {}
    by_hand = _dit_forward_flops(1024, 384, 12)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math:  # attention as bmm
        model(*args)
    assert abs(rep["dense"]["fwd_flops"] / by_hand - 1) < 0.01
    assert rep["dense"]["fwd_flops"] == math.get_total_flops()
    (route,) = rep["routes"]
    section6 = tread_flop_ratio(12, [(2, 8, 0.5)], 1024, 384)
    assert route["estimated_ratio"] == section6
    assert abs(route["fwd_ratio"] - section6) < 0.002 and abs(route["step_ratio"] - section6) < 0.002
    assert abs(section6 - 0.6635) < 1e-4 and abs(route["fwd_ratio"] - 0.709) > 0.04  # not the old 0.709


def test_tread_ratio_formula():
    assert tread_flop_ratio(12, [(2, 8, 0.0)], 256, 768) == 1.0
    # attention negligible (N << d): the linear rule of thumb (B - L * ratio) / B
    assert abs(tread_flop_ratio(12, [(2, 8, 0.5)], 16, 100000) - (12 - 7 * 0.5) / 12) < 1e-4
    # attention dominant (N >> d): kept blocks cost (1 - ratio)^2
    assert abs(tread_flop_ratio(4, [(0, 3, 0.5)], 100000, 8) - 0.25) < 1e-3
    # negative indices, Route objects, several routes, a protected prefix
    assert tread_flop_ratio(12, [routefx.Route(2, -4, 0.5)], 256, 384) == tread_flop_ratio(12, [(2, 8, 0.5)], 256, 384)
    two = tread_flop_ratio(12, [(1, 3, 0.5), (5, 8, 0.25)], 256, 384)
    assert tread_flop_ratio(12, [(1, 3, 0.5)], 256, 384) > two > tread_flop_ratio(12, [(1, 8, 0.5)], 256, 384)
    assert tread_flop_ratio(6, [(1, 4, 0.5)], 18, 64, protect=2) > tread_flop_ratio(6, [(1, 4, 0.5)], 18, 64)


def test_mamba_cpu_scan_is_counted_and_cuda_kernels_are_reported(monkeypatch):
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm is not installed")
    from routefx import mamba_compat
    model = create("DiM-T/2")
    args = example_inputs(model, 2)
    cpu = count_flops(lambda: model(*args))
    assert cpu.uncounted == {} and cpu.by_op["aten.bmm"] > 0  # the torch scan's einsums
    # with mamba-ssm's CUDA kernels the scan and conv run outside the dispatcher: reported per module
    monkeypatch.setattr(mamba_compat, "_loaded", mamba_compat._loaded._replace(fallback=False))
    reported = count_flops(lambda: model(*args)).uncounted
    assert list(reported) == [k for k in reported if k.startswith("mamba_ssm Mamba")] and len(reported) == 1
    assert next(iter(reported.values())) == len(model.layers)
