"""routefx on seventeen stock diffusers (0.42.1) transformers (Z.TEN + Z.MORE), each in three shapes (tests/diffusers_zoo.py:
"text8", "text_eq_tokens": text as long as the image stream, "hidden_eq_tokens": hidden size = N),
route (1, -2, 0.5), nothing but the routes passed to routefx.apply.

Every routed training forward is compared with a hand-written TREAD reference made with hooks on
the ORIGINAL model at the same kept ids (tests/diffusers_reference.py): outputs and gradients of
every parameter, the image-token count each block sees, the text stream, and routefx's selection
against TREAD's selector at the same RNG state. Eval mode must be the original forward.

One routed run per (class, case) is shared by the tests of that pair (`_run`, cached).
"""
import functools
import warnings

import pytest
import torch

import routefx
import diffusers_zoo as Z
import diffusers_reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTE = (1, -2, 0.5)
SEED = 123
ATOL = 1e-5
GRAD_RTOL = 1e-4

# the chain each class's forward runs, in call order (the blocks a route indexes)
EXPECTED_CHAIN = {
    "DiTTransformer2DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "PixArtTransformer2DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "SD3Transformer2DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "FluxTransformer2DModel": ["transformer_blocks.0", "transformer_blocks.1",
                               "single_transformer_blocks.0", "single_transformer_blocks.1"],
    "HunyuanDiT2DModel": [f"blocks.{i}" for i in range(6)],
    "AuraFlowTransformer2DModel": ["joint_transformer_blocks.0", "joint_transformer_blocks.1",
                                   "single_transformer_blocks.0", "single_transformer_blocks.1"],
    "CogView4Transformer2DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "WanTransformer3DModel": [f"blocks.{i}" for i in range(4)],
    "LTXVideoTransformer3DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "QwenImageTransformer2DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "SD3.5Transformer2DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "CogVideoXTransformer3DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "CogVideoXTransformer3DModel/rope": [f"transformer_blocks.{i}" for i in range(4)],
    "MochiTransformer3DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "AllegroTransformer3DModel": [f"transformer_blocks.{i}" for i in range(4)],
    "ChromaTransformer2DModel": ["transformer_blocks.0", "transformer_blocks.1",
                                 "single_transformer_blocks.0", "single_transformer_blocks.1"],
    "Flux2Transformer2DModel": ["transformer_blocks.0", "transformer_blocks.1",
                                "single_transformer_blocks.0", "single_transformer_blocks.1"],
}
NAMES = Z.TEN + Z.MORE
PAIRS = [(n, c) for n in NAMES for c in Z.CASES if (n, c) not in Z.SKIP]

OUTPUT_PROJ = {"DiTTransformer2DModel": "proj_out_2"}  # the last linear of the model (default: proj_out)
CHECKS = ("chain_and_ids", "train_step", "token_counts", "text_untouched", "eval_is_original", "matches_reference")


def _cases():
    return [pytest.param(check, name, case, id=f"{check}-{name}-{case}") for check in CHECKS for name, case in PAIRS]


@functools.lru_cache(maxsize=None)
def _run(name, case):
    """Everything the checks look at, from one routed run and one reference run; an exception
    raised by routefx is kept and re-raised by every check of the pair."""
    try:
        return _do_run(name, case), None
    except Exception as e:  # noqa: BLE001
        return None, e


def _result(name, case):
    res, err = _run(name, case)
    if err is not None:
        raise err
    return res


def _grads(model):
    g = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return g


def _do_run(name, case):
    model, args, kwargs = Z.build(name, case)
    chain_expected = EXPECTED_CHAIN[name]
    t_len = R.text_len(model, name, args, kwargs)
    res = dict(model=model, args=args, kwargs=kwargs, t_len=t_len, N=Z.dims(case).N, B=Z.dims(case).B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = routefx.apply(model, [ROUTE])
        torch.manual_seed(SEED)
        routed(*args, **kwargs)  # first training call: capture (+ one run)
    res["chain"] = list(routefx.router(routed)._graphs[-1][1].chain.names)
    (resolved,) = routefx.router(routed)._graphs[-1][1].routes
    start, end = resolved.start, resolved.end
    res.update(start=start, end=end, routed=routed, protect=routefx.router(routed).routing[0].protect)
    chain = chain_expected  # hooks on the blocks the model code runs (the test asserts routefx found them)

    # routed training forward + backward, recording what every block sees
    with R.recorder(model, name, chain, t_len) as seen:
        torch.manual_seed(SEED)
        out = Z.sample(routed(*args, **kwargs))
    info = routefx.router(routed).routing[0]
    ids_all = info.ids
    ids = ids_all[:, info.protect:] - info.protect
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weight).mean().backward()
    res.update(out=out.detach(), ids_all=ids_all, ids=ids, seen=dict(seen), grads=_grads(model))

    # the hand-written reference on the original model at the same ids, same RNG state
    with R.tread_hooks(model, name, chain, start, end, ids, ROUTE[2], t_len) as ref, routefx.unrouted(model):
        torch.manual_seed(SEED)
        ref_out = Z.sample(model(*args, **kwargs))
    (ref_out * weight).mean().backward()
    res.update(ref_out=ref_out.detach(), ref=ref, ref_grads=_grads(model))

    # the dense forward at the same RNG state (the route must change the output)
    with torch.no_grad(), routefx.unrouted(model):
        torch.manual_seed(SEED)
        res["dense_out"] = Z.sample(model(*args, **kwargs))

    # eval: the original forward, bit for bit
    with torch.no_grad():
        routed.eval()
        res["eval_routed"] = Z.sample(routed(*args, **kwargs))
        res["eval_model"] = Z.sample(model.eval()(*args, **kwargs))
    routed.train()
    return res


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------ checks

def check_chain_and_ids(r, name):
    assert r["chain"] == EXPECTED_CHAIN[name], f"chain {r['chain']}"
    assert r["protect"] == 0, f"protect={r['protect']}: no token is prepended to the image stream of {name}"
    N, B = r["N"], r["B"]
    n_keep = N - int(N * ROUTE[2])
    ids = r["ids"]
    assert ids.shape == (B, n_keep), ids.shape
    assert ((ids >= 0) & (ids < N)).all(), ids
    assert (ids.diff(dim=1) > 0).all(), f"ids must be sorted and distinct per row: {ids}"
    if R.shared(name):
        assert (ids == ids[:1]).all(), f"{name} gets an unbatched per-token table: one index set expected, {ids}"
    assert torch.equal(ids, r["ref"].selection), \
        f"routefx selected {ids.tolist()}, TREAD's selector at the same RNG state {r['ref'].selection.tolist()}"


def check_train_step(r, name):
    g = r["grads"]
    bad = [n for n, v in g.items() if v is not None and not torch.isfinite(v).all()]
    assert not bad, f"non-finite grads: {bad}"
    chain = EXPECTED_CHAIN[name]
    groups = {"before the route": chain[0], "inside the route": chain[r["start"]],
              "after the route": chain[-1], "output projection": OUTPUT_PROJ.get(name, "proj_out")}
    for where, prefix in groups.items():
        got = [v.abs().sum().item() for n, v in g.items() if n.startswith(prefix + ".") and v is not None]
        assert got and sum(got) > 0, f"no gradient reaches {prefix} ({where})"


def check_token_counts(r, name):
    N, s, e, t_len = r["N"], r["start"], r["end"], r["t_len"]
    n_keep = N - int(N * ROUTE[2])
    for i, block in enumerate(EXPECTED_CHAIN[name]):
        want = n_keep if s <= i <= e else N
        n_img, txt = r["seen"][block]
        assert n_img == want, f"{block} saw {n_img} image tokens, TREAD runs it on {want}"
        if txt is not None:
            assert txt.shape[1] == t_len, f"{block} saw {txt.shape[1]} text tokens, the model has {t_len}"


def check_text_untouched(r, name):
    chain = EXPECTED_CHAIN[name]
    for i, block in enumerate(chain):
        got, want = r["seen"][block][1], r["ref"].seen[block][1]
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape, f"{block}: text {tuple(got.shape)} vs reference {tuple(want.shape)}"
        if i <= r["start"]:
            assert torch.equal(got, want), f"{block}: text entering differs, max {_max_diff(got, want):.3g}"
        else:
            assert torch.allclose(got, want, atol=ATOL, rtol=1e-4), \
                f"{block}: text entering differs, max {_max_diff(got, want):.3g}"


def check_eval_is_original(r, name):
    assert torch.equal(r["eval_routed"], r["eval_model"])


def check_matches_reference(r, name):
    out, ref = r["out"], r["ref_out"]
    assert out.shape == ref.shape
    assert _max_diff(out, r["dense_out"]) > 1e-4, "routing did not change the output: the comparison is vacuous"
    assert torch.allclose(out, ref, atol=ATOL, rtol=1e-4), f"output max diff {_max_diff(out, ref):.3g}"
    bad = []
    for n, g in r["grads"].items():
        gr = r["ref_grads"][n]
        if (g is None) != (gr is None):
            bad.append(f"{n}: grad {'missing' if g is None else 'extra'}")
        elif g is not None:
            tol = GRAD_RTOL * max(gr.abs().max().item(), 1e-3) + 1e-7
            if _max_diff(g, gr) > tol:
                bad.append(f"{n}: {_max_diff(g, gr):.3g} (max |g| {gr.abs().max().item():.3g})")
    assert not bad, f"{len(bad)} gradients differ: " + "; ".join(bad[:6])


@pytest.mark.parametrize("check, name, case", _cases())
def test_diffusers(check, name, case):
    globals()[f"check_{check}"](_result(name, case), name)


@pytest.mark.parametrize("name, case", [pytest.param(n, c, id=f"{n}-{c}") for n, c in PAIRS])
def test_reference_keeping_every_token_is_the_dense_forward(name, case):
    """The reference's hooks themselves: with every token kept (ids = 0..N-1 in order) over the same
    span they must change nothing (catches a hook that drops, reorders or misplaces a stream)."""
    model, args, kwargs = Z.build(name, case)
    chain, N, B = EXPECTED_CHAIN[name], Z.dims(case).N, Z.dims(case).B
    start, end = ROUTE[0] % len(chain), ROUTE[1] % len(chain)
    t_len = R.text_len(model, name, args, kwargs)
    with torch.no_grad():
        torch.manual_seed(SEED)
        dense = Z.sample(model(*args, **kwargs))
        ids = torch.arange(N).expand(B, -1)
        with R.tread_hooks(model, name, chain, start, end, ids, 0.0, t_len, draw=False) as ref:
            torch.manual_seed(SEED)
            out = Z.sample(model(*args, **kwargs))
    assert torch.allclose(out, dense, atol=1e-6, rtol=0), f"max diff {_max_diff(out, dense):.3g}"
    assert [ref.seen[b][0] for b in chain] == [N] * len(chain)


def test_a_caching_leaf_of_a_stock_model_leaves_no_fake_tensor():
    """QwenImage's rotary module caches its tables (`functools.lru_cache` on methods). Passed as a
    leaf it runs on fake tensors during capture: its caches must come out empty of them, and the
    routed forward must equal the one that traces through the module."""
    outs = []
    for leaves in ((), ("pos_embed",)):
        model, args, kwargs = Z.build("QwenImageTransformer2DModel", "text8")
        routed = routefx.apply(model, [ROUTE], leaf_modules=leaves)
        torch.manual_seed(SEED)
        outs.append(Z.sample(routed(*args, **kwargs)))
        routed.eval()
        with torch.no_grad():
            assert torch.equal(Z.sample(routed(*args, **kwargs)), Z.sample(model(*args, **kwargs)))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
