"""Adversarial trap suite: models whose structure fools a shape-based token router.

Each TRAPS entry: (id, build -> (model, inputs), reference(model, inputs, routes) -> (out, ids),
routes, expect, apply_kwargs). expect "exact": routed training output, parameter gradients and
drawn ids equal the hand-written TREAD reference, eval equals the model. ("refuse", regex): the
first training call (or apply) raises RouteError/CaptureError naming the cause.
("either", regex): exact, or a refusal matching regex.
"""
import functools
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routefx
from routefx.api import _find_routed
from routefx.errors import CaptureError, RouteError

from trap_models import (  # noqa: E402
    N_IMG, split_inputs, tread, randomize, latent, randn, draw_ids, take, put,
    ResOutside, ResScaledCond, AltAttnFF, CondModel, TextModel, LearnedMem, CFGNull,
    SeqFirst, ChanFirst, Grid, tread_grid, MaskModel, BiasModel, TokTimeModel, RawTimeModel,
    PosInside, AuxModel, RepaModel, PrefixModel, SuffixModel, tread_suffix, X0Model, KwModel,
    TopOps, UViT, SlicedOut, HypoModel, JointInside, DualStream, ResSpell, SelfMemory,
    RopeTable, tread_rope_table, RegPrefix, MaskAndText,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REFUSALS = (RouteError, CaptureError)


def _double(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    if isinstance(v, tuple):
        return tuple(_double(a) for a in v)
    if isinstance(v, dict):
        return {k: _double(a) for k, a in v.items()}
    return v


def call(m, inputs):
    args, kwargs = split_inputs(inputs)
    return m(*args, **kwargs)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    import dataclasses
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    return []


def _loss(out):
    total = 0
    for k, t in enumerate(_tensors(out)):
        if t.is_floating_point():
            w = torch.randn(t.shape, generator=torch.Generator().manual_seed(100 + k), dtype=t.dtype)
            total = total + (t * w).sum()
    return total


def ref(protect=0):
    return functools.partial(_tread_ref, protect=protect)


def _tread_ref(model, inputs, routes, protect=0):
    return tread(model, inputs, routes, protect)


def _tread_repa(model, inputs, routes):
    """RepaModel with the REPA hidden taken inside the route: routefx returns it whole, the kept
    tokens' values scattered into the route-start stream (a block output leaving a route is
    scattered like the stream; `routefx.router(routed).routing[i].mask` says which tokens were bypassed)."""
    (s, e, r), = routes
    h, ctx = model.pre(*inputs)
    for i in range(model.depth):
        if i == s:
            base, ids = h, draw_ids(h.shape[0], h.shape[1], r)
            h = take(h, ids)
        h = model.blocks[i](h)
        if i == model.layer:
            ctx["repa"] = model.proj(put(base, ids, h) if s <= i <= e else h)
        if i == e:
            h = put(base, ids, h)
    return model.post(h, ctx), [ids]


def build(cls, inputs_fn, seed=0, **kw):
    def fn():
        torch.manual_seed(0)
        m = randomize(cls(**kw), seed)
        return m, inputs_fn()
    fn.__name__ = cls.__name__
    return fn


def img(B=2):
    return lambda: (latent(B),)


def _tok_mask(B, N=N_IMG):
    m = torch.ones(B, N, dtype=torch.bool)
    m[0, 3] = m[0, 10] = m[1, 5] = False
    return m


def _text_mask(B, L):
    m = torch.ones(B, L, dtype=torch.bool)
    m[:, L - 3:] = False
    m[0, 1] = False
    return m


class KeyBias(BiasModel):
    """A (B, 1, 1, N) additive key bias: the token dim is dim 3 only."""
    ctx_tokens = {"bias": (3,)}


POS_RE = r"blocks\.\d|ordered=True"


def _names(name):
    """A refusal must name the input and suggest per_token."""
    return rf"(?s)(\b{name}\b.*per_token|per_token.*\b{name}\b)"


# ----------------------------------------------------------------------------- the table
R = [(1, 3, 0.5)]
R_END = [(2, 4, 0.5)]

TRAPS = [
    # pattern 1: residual adds outside blocks
    ("res_outside_add", build(ResOutside, img(), variant="add"), ref(), R, "exact", {}),
    ("res_outside_rev_last", build(ResOutside, img(), variant="rev"), ref(), R_END, "exact", {}),
    ("res_half_cond", build(ResScaledCond, lambda: (latent(2), randn(2, 12)), variant="half"),
     ref(), R, "exact", {}),
    ("res_gated", build(ResScaledCond, lambda: (latent(2), randn(2, 12)), variant="gate"),
     ref(), R_END, "exact", {}),
    ("alt_attn_ff", build(AltAttnFF, img(), depth=6), ref(), [(1, 4, 0.5)], "exact", {}),
    # pattern 2: coincidences with N = 16
    ("cond_width16", build(CondModel, lambda: (latent(2), randn(2, 16))), ref(), R, "exact", {}),
    ("text_len16", build(TextModel, lambda: (latent(2), randn(2, 16, 10))), ref(), R, "exact", {}),
    ("learned_mem16", build(LearnedMem, img()), ref(), R, "exact", {}),
    ("cfg_null16", build(CFGNull, lambda: (latent(2), randn(2, 16, 12),
                                           torch.tensor([True, False]))), ref(), R, "exact", {}),
    ("batch16", build(ResOutside, img(16)), ref(), R, "exact", {}),
    ("hidden16", build(ResOutside, img(), d=16), ref(), R, "exact", {}),
    ("hidden16_heads16", build(ResOutside, img(), d=16, heads=16), ref(), R, "exact", {}),
    ("cond16_hidden16", build(CondModel, lambda: (latent(2), randn(2, 16)), d=16), ref(), R, "exact", {}),
    ("text16_mask16", build(TextModel, lambda: (latent(2), randn(2, 16, 10), _text_mask(2, 16)),
                            mem_mask=True), ref(), R, "exact", {}),
    ("text16_mask16_batch16", build(TextModel, lambda: (latent(16), randn(16, 16, 10),
                                                        _text_mask(16, 16)), mem_mask=True),
     ref(), R, "exact", {}),
    # pattern 3: token layouts
    # sequence-first streams are refused naming the layout (routefx routes (batch, tokens, ...))
    ("seq_first_mha", build(SeqFirst, img()), ref(), R, ("refuse", r"sequence-first"), {}),
    # batch 16 = 16 tokens: the layout cannot be read off the shapes; the apply-time check refuses it
    ("seq_first_batch16", build(SeqFirst, img(16)), ref(), R,
     ("refuse", r"fails routefx's check on real values.*sequence-first"), {}),
    ("channels_first", build(ChanFirst, img()), ref(), R, ("refuse", r"fails when it gets fewer tokens.*may be laid out channels-first"), {}),
    ("grid_per_token", build(Grid, img()), tread_grid, R,
     ("either", r"(?i)grid|layout|spatial|\(B, ?H, ?W|4-?d"), {}),
    ("grid_conv", build(Grid, img(), conv=True), tread_grid, R,
     ("refuse", r"(?i)conv|grid|layout|spatial|blocks\.1"), {}),
    # pattern 4: per-token side inputs
    ("kpm_declared", build(MaskModel, lambda: (latent(2), _tok_mask(2))), ref(), R, "exact",
     {"per_token": ["mask"]}),
    ("kpm_undeclared", build(MaskModel, lambda: (latent(2), _tok_mask(2))), ref(), R,
     ("either", _names("mask")), {}),
    ("bias_b1nn_declared", build(BiasModel, lambda: (latent(2), randn(2, 1, 16, 16))), ref(), R,
     "exact", {"per_token": ["bias"]}),
    ("bias_b1nn_undeclared", build(BiasModel, lambda: (latent(2), randn(2, 1, 16, 16))), ref(), R,
     ("either", _names("bias")), {}),
    ("bias_bhnn_declared", build(BiasModel, lambda: (latent(2), randn(2, 2, 16, 16))), ref(), R,
     "exact", {"per_token": ["bias"]}),
    ("bias_heads16_undeclared", build(BiasModel, lambda: (latent(2), randn(2, 16, 16, 16)), d=16,
                                      heads=16), ref(), R, ("either", _names("bias")), {}),
    ("tok_time_raw_declared", build(RawTimeModel, lambda: (latent(2), randn(2, 16))), ref(), R,
     "exact", {"per_token": ["t"]}),
    ("tok_time_raw_undeclared", build(RawTimeModel, lambda: (latent(2), randn(2, 16))), ref(), R,
     ("either", _names("t")), {}),
    ("tok_time_embedded", build(TokTimeModel, lambda: (latent(2), randn(2, 16)), variant="embed"),
     ref(), R, ("either", r"(?i)temb|blocks\.1|per_token"), {}),
    ("class_map_declared", build(TokTimeModel, lambda: (latent(2), randn(2, 16, 12)),
                                 variant="cmap"), ref(), R, "exact", {"per_token": ["t"]}),
    ("class_map_undeclared", build(TokTimeModel, lambda: (latent(2), randn(2, 16, 12)),
                                   variant="cmap"), ref(), R, ("either", _names("t")), {}),
    # pattern 5: positions computed inside a block from its input length
    ("rope_arange", build(PosInside, img(), kind="rope"), ref(), R,
     ("refuse", POS_RE), {}),
    ("pos_slice", build(PosInside, img(), kind="slice"), ref(), R, ("refuse", POS_RE), {}),
    ("sincos_len", build(PosInside, img(), kind="sincos"), ref(), R, ("refuse", POS_RE), {}),
    ("rope_arange_ordered", build(PosInside, img(), kind="rope"), ref(), R, "exact",
     {"ordered": True}),
    ("pos_slice_ordered", build(PosInside, img(), kind="slice"), ref(), R, "exact",
     {"ordered": True}),
    ("sincos_len_ordered", build(PosInside, img(), kind="sincos"), ref(), R_END, "exact",
     {"ordered": True}),
    # pattern 6: block outputs with aux values
    ("aux_tuple_logits", build(AuxModel, img(), kind="tuple"), ref(), R, "exact", {}),
    ("aux_dict_pooled", build(AuxModel, img(), kind="dict"), ref(), R, "exact", {}),
    ("aux_dataclass", build(AuxModel, img(), kind="dataclass"), ref(), R, "exact", {}),
    ("repa_before_route", build(RepaModel, img(), layer=0), ref(), R, "exact", {}),
    ("repa_after_route", build(RepaModel, img(), layer=4), ref(), R, "exact", {}),
    ("repa_inside_route", build(RepaModel, img(), layer=2), _tread_repa, R, "exact", {}),
    # pattern 7: prefix tokens (never routed)
    ("prefix_hstack_auto", build(PrefixModel, lambda: (latent(2), randn(2, 5, 10))), ref(5), R,
     "exact", {}),
    ("prefix_hstack_protect", build(PrefixModel, lambda: (latent(2), randn(2, 5, 10))), ref(5),
     R, "exact", {"protect": 5}),
    ("prefix_assign", build(PrefixModel, lambda: (latent(2), randn(2, 5, 10)), kind="assign"),
     ref(5), R, "exact", {}),
    ("prefix_text16", build(PrefixModel, lambda: (latent(2), randn(2, 16, 10)), L=16), ref(16),
     R, "exact", {}),
    ("prefix_text_regs_longer", build(PrefixModel, lambda: (latent(2), randn(2, 20, 10)), L=20,
                                      regs=4), ref(24), R, "exact", {}),
    ("prefix_text_regs_protect", build(PrefixModel, lambda: (latent(2), randn(2, 20, 10)), L=20,
                                       regs=4), ref(24), R_END, "exact", {"protect": 24}),
    ("suffix_text", build(SuffixModel, lambda: (latent(2), randn(2, 5, 10))), tread_suffix, R,
     ("either", r"(?i)suffix|after|text|\bcat\b|protect|prefix"), {}),
    # pattern 8: several token-shaped block arguments
    ("x0_second_arg", build(X0Model, img()), ref(), R, "exact", {}),
    ("x0_first_arg", build(X0Model, img(), swap=True), ref(), R, "exact", {}),
    ("x0_same_at_block0", build(X0Model, img(), same=True), ref(), R, "exact", {}),
    ("x0_first_arg_same", build(X0Model, img(), swap=True, same=True), ref(), R_END, "exact", {}),
    ("kw_call_reordered", build(KwModel, lambda: (latent(2), randn(2, 16))), ref(), R, "exact", {}),
    ("model_kwargs_reordered", build(KwModel, lambda: {"c": randn(2, 16), "x": latent(2)}),
     ref(), R, "exact", {}),
    ("model_kwargs_text_mask", build(TextModel, lambda: {"text_mask": _text_mask(2, 16),
                                                         "text": randn(2, 16, 10), "x": latent(2)},
                                     mem_mask=True), ref(), R, "exact", {}),
    # pattern 9: top-level code between blocks
    # (bypassed tokens skip the WHOLE iterations s..e: the per-iteration scale of iteration e and
    # the `+ pos` of iteration s do not touch them; a router may refuse instead, naming the op)
    ("top_scale", build(TopOps, img(), kind="scale"), ref(), R,
     ("either", r"trap_models\.py:\d+|scales|\bmul\b"), {}),
    ("top_layernorm", build(TopOps, img(), kind="norm"), ref(), R_END, "exact", {}),
    ("top_center_inside", build(TopOps, img(), kind="center"), ref(), R, "exact", {}),
    ("top_meancond_inside", build(TopOps, img(), kind="meancond"), ref(), R, "exact", {}),
    ("top_pos_param_declared", build(TopOps, img(), kind="pos"), ref(), R,
     ("either", r"trap_models\.py:\d+|pos2"), {"per_token": ["pos2"]}),
    ("top_pos_param_undeclared", build(TopOps, img(), kind="pos"), ref(), R,
     ("either", _names("pos2")), {}),
    ("uvit_skip_nested", build(UViT, img()), ref(), [(1, 4, 0.5)], "exact", {}),
    ("uvit_skip_into_route", build(UViT, img()), ref(), [(2, 4, 0.5)], "exact", {}),
    ("uvit_skip_inside_only", build(UViT, img()), ref(), [(2, 3, 0.5)], "exact", {}),
    # blocks that append register tokens and a slice that cuts them off outside: refused, naming
    # the block (where the stream sits in a longer output cannot be told from shapes)
    ("sliced_out_shape", build(SlicedOut, img()), ref(), R,
     ("refuse", r"Block 0 \('blocks.0'\) returns \(2, 20, 12\) from a stream of \(2, 16, 12\)"), {}),
    ("sliced_out_const16", build(SlicedOut, img(), kind="const"), ref(), R,
     ("refuse", r"trap_models\.py:\d+|blocks\.\d|slice"), {}),
    # route placement / sizes / combined coincidences
    ("two_routes", build(ResOutside, img(), depth=6), ref(), [(0, 1, 0.5), (3, 4, 0.25)],
     "exact", {}),
    ("route_from_block0", build(ResOutside, img()), ref(), [(0, 2, 0.75)], "exact", {}),
    ("ratio_0p3_batch3", build(ResOutside, img(3)), ref(), [(1, 3, 0.3)], "exact", {}),
    ("single_block_route", build(CondModel, lambda: (latent(2), randn(2, 16))), ref(),
     [(2, 2, 0.5)], "exact", {}),
    ("cond16_batch16", build(CondModel, lambda: (latent(16), randn(16, 16)), d=16), ref(), R,
     "exact", {}),
    ("kpm_batch16_undeclared", build(MaskModel, lambda: (latent(16), _tok_mask(16))), ref(), R,
     ("either", _names("mask")), {}),
    ("bias_shared_declared", build(BiasModel, lambda: (latent(2), randn(1, 1, 16, 16))), ref(), R,
     "exact", {"per_token": ["bias"]}),
    ("text16_not_per_token", build(TextModel, lambda: (latent(2), randn(2, 16, 10),
                                                       _text_mask(2, 16)), mem_mask=True),
     ref(), R, "exact", {"not_per_token": ["text", "text_mask"]}),
    # more: joint attention inside blocks, dual streams, residual spellings, memories
    ("joint_inside_text16", build(JointInside, lambda: (latent(2), randn(2, 16, 10))), ref(), R,
     "exact", {}),
    ("dual_stream_text16", build(DualStream, lambda: (latent(2), randn(2, 16, 10))), ref(), R,
     "exact", {}),
    ("dual_stream_text5_last", build(DualStream, lambda: (latent(2), randn(2, 5, 10))), ref(),
     R_END, "exact", {}),
    ("res_inplace", build(ResSpell, img(), kind="inplace"), ref(), R, "exact", {}),
    ("res_add_alpha", build(ResSpell, img(), kind="add_alpha"), ref(), R, "exact", {}),
    ("res_addcmul_gate", build(ResSpell, img(), kind="addcmul"), ref(), R, "exact", {}),
    ("res_token_gate", build(ResSpell, img(), kind="tokgate"), ref(), R, "exact", {}),
    # (a route starting at block 1 would make block 0's `blk(h) + a * x0` with h == x0 a residual
    # of block 0 - a reading as valid as this reference's; from block 2 on x0 is a side input)
    ("res_x0_outside", build(ResSpell, img(), kind="x0res"), ref(), [(2, 3, 0.5)], "exact", {}),
    ("res_tuple_none", build(ResSpell, img(), kind="tuple_none"), ref(), R, "exact", {}),
    ("returns_final_hidden", build(ResSpell, img(), kind="final_hidden"), ref(), R_END, "exact",
     {}),
    ("self_memory16", build(SelfMemory, img()), ref(), R, "exact", {}),
    # an unbatched table follows ONE index set (the documented default shares it for the batch,
    # with a warning); asked for per-sample selections, routefx refuses naming the table
    ("rope_table_unbatched", build(RopeTable, img()), tread_rope_table, R,
     ("refuse", r"unbatched per-token table 'rope"), {"shared_indices": False}),
    ("bias_bhnn_undeclared", build(BiasModel, lambda: (latent(2), randn(2, 2, 16, 16))), ref(), R,
     ("either", _names("bias")), {}),
    ("key_bias_b11n_declared", build(KeyBias, lambda: (latent(2), randn(2, 1, 1, 16))), ref(), R,
     "exact", {"per_token": ["bias"]}),
    ("prefix_registers", build(RegPrefix, img()), ref(4), R, "exact", {}),
    # everything 16 at once
    ("kpm_and_textmask16", build(MaskAndText, lambda: (latent(2), randn(2, 16, 10), _tok_mask(2),
                                                       _text_mask(2, 16))), ref(), R, "exact",
     {"per_token": ["mask"]}),
    ("kpm_and_textmask16_kwargs", build(MaskAndText, lambda: {
        "x": latent(2), "text": randn(2, 16, 10), "mask": _tok_mask(2),
        "text_mask": _text_mask(2, 16)}), ref(), R_END, "exact", {"per_token": ["mask"]}),
    ("learned_mem_all16", build(LearnedMem, img(16), d=16), ref(), R, "exact", {}),
    ("text_all16", build(TextModel, lambda: (latent(16), randn(16, 16, 16)), d=16, text_dim=16),
     ref(), R, "exact", {}),
]  # end of TRAPS


def _run_exact(model, inputs, reference, routes, kw, allow_refusal=None):
    model.train()
    try:
        routed = routefx.apply(model, routes=routes, **kw)
        torch.manual_seed(7)
        out = call(routed, inputs)
    except REFUSALS as e:
        if allow_refusal is not None and re.search(allow_refusal, str(e)):
            return
        raise
    _loss(out).backward()
    params = [p for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    info = _find_routed(routed)
    got_ids = [r.ids.clone() for r in info.routing]
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    ref_out, ref_ids = reference(model, inputs, routes)
    _loss(ref_out).backward()

    outs, routs = _tensors(out), _tensors(ref_out)
    assert len(outs) == len(routs)
    for a, b in zip(outs, routs):
        assert a.shape == b.shape, (a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg="routed output != reference")
    for (name, p), g in zip(model.named_parameters(), grads):
        if p.grad is None:
            assert g is None or not g.any(), f"grad of {name}: routed has one, reference none"
            continue
        assert g is not None, f"routed gave no grad for {name}"
        torch.testing.assert_close(g, p.grad, atol=1e-9, rtol=1e-7, msg=f"grad of {name}")
    assert len(got_ids) == len(ref_ids), (len(got_ids), len(ref_ids))
    for a, b in zip(got_ids, ref_ids):
        assert torch.equal(a.cpu().long(), b), f"ids differ:\n{a}\n{b}"

    routed.eval()
    model.eval()
    with torch.no_grad():
        ev, mv = _tensors(call(routed, inputs)), _tensors(call(model, inputs))
    for a, b in zip(ev, mv):
        assert torch.equal(a, b), "eval output differs from the model's own"


def _run_refuse(model, inputs, routes, kw, regex):
    model.train()
    with pytest.raises(REFUSALS) as ei:
        routed = routefx.apply(model, routes=routes, **kw)
        torch.manual_seed(7)
        call(routed, inputs)
    assert re.search(regex, str(ei.value)), f"message does not name the cause:\n{ei.value}"


@pytest.mark.parametrize("trap", TRAPS, ids=[t[0] for t in TRAPS])
def test_trap(trap):
    tid, build_fn, reference, routes, expect, kw = trap
    model, inputs = build_fn()
    model = model.double()
    inputs = _double(inputs)
    if expect == "exact":
        _run_exact(model, inputs, reference, routes, kw)
    elif expect[0] == "either":
        _run_exact(model, inputs, reference, routes, kw, allow_refusal=expect[1])
    else:
        _run_refuse(model, inputs, routes, kw, expect[1])


EXACTS = [t for t in TRAPS if t[4] == "exact" or t[4][0] == "either"]


@pytest.mark.parametrize("trap", EXACTS, ids=[t[0] for t in EXACTS])
def test_reference_sanity(trap):
    """Ratio 0 keeps every token in order: the reference must be the plain model forward."""
    tid, build_fn, reference, routes, expect, kw = trap
    model, inputs = build_fn()
    model = model.double().train()
    inputs = _double(inputs)
    zero = [(s, e, 0.0) for s, e, _ in routes]
    with torch.no_grad():
        torch.manual_seed(7)
        a, ids = reference(model, inputs, zero)
        b = call(model, inputs)
    for x, y in zip(_tensors(a), _tensors(b)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


@st.composite
def _hypo_case(draw):
    depth = draw(st.integers(3, 6))
    s = draw(st.integers(0, depth - 1))
    e = draw(st.integers(s, depth - 1))
    ratio = draw(st.sampled_from([0.25, 0.3, 0.5, 0.75]))
    return dict(depth=depth, route=(s, e, ratio),
                L=draw(st.sampled_from([3, 16, 20])), C=draw(st.sampled_from([5, 16])),
                B=draw(st.sampled_from([1, 2, 3, 16])), heads=draw(st.sampled_from([2, 4, 16])),
                outside=draw(st.booleans()))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_hypo_case())
def test_hypothesis_coincidences(case):
    """Route placement and coincidence sizes (text length, cond width, batch, heads incl. 16)."""
    torch.manual_seed(0)
    model = randomize(HypoModel(C=case["C"], heads=case["heads"], outside=case["outside"],
                                depth=case["depth"])).double()
    B, L = case["B"], case["L"]
    inputs = (latent(B).double(), randn(B, L, 10).double(), randn(B, case["C"], seed=3).double())
    _run_exact(model, inputs, ref(), [case["route"]], {})
