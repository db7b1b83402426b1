"""The DiM backbone on mamba-ssm's own modules, and the pure-torch scan that runs it on CPU.

Needs mamba-ssm installed (CI installs it): this module fails at import without it, on purpose.
"""
import pytest
import torch

from routefx import mamba_compat
from routefx.mamba_compat import load_mamba, selective_scan_torch

SSM = load_mamba()  # before any mamba_ssm import: on CPU it registers the kernel placeholder
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402

from routefx.backbones.mamba import DiM, Block, build_model, example_inputs  # noqa: E402

DEVICE = "cpu" if SSM.fallback else "cuda"  # mamba-ssm's CUDA kernels take CUDA tensors only


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The scan is hundreds of tiny ops: one thread is as fast, and immune to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
#                                  selective_scan_torch
# --------------------------------------------------------------------------------------------

def _scan_inputs(form, complex_a=False, batch=2, dim=6, dstate=4, length=33, groups=2):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.rand(dim, dstate, generator=g) - 0.1
    if complex_a:
        A = torch.complex(A, r(dim, dstate))
    steps = 2 * length if complex_a else length
    shape = {"fixed": (dim, dstate), "varying": (batch, dstate, steps),
             "grouped": (batch, groups, dstate, steps)}[form]
    if form == "fixed" and complex_a:
        B, C = torch.complex(r(*shape), r(*shape)), torch.complex(r(*shape), r(*shape))
    else:
        B, C = r(*shape), r(*shape)
    return dict(u=r(batch, dim, length), delta=0.5 * torch.rand(batch, dim, length, generator=g),
                A=A, B=B, C=C, D=r(dim), z=r(batch, dim, length), delta_bias=0.1 * r(dim))


def _run(fn, inputs, drop, softplus, last_state):
    args = {k: v.clone().requires_grad_() for k, v in inputs.items() if k not in drop}
    out = fn(**args, delta_softplus=softplus, return_last_state=last_state)
    outs = out if last_state else (out,)
    loss = sum((o.real if o.is_complex() else o).sin().sum() for o in outs)
    grads = torch.autograd.grad(loss, list(args.values()))
    return outs, dict(zip(args, grads))


@pytest.mark.parametrize("drop", [(), ("z",), ("D",), ("delta_bias",), ("z", "D", "delta_bias")])
@pytest.mark.parametrize("form", ["fixed", "varying", "grouped"])
@pytest.mark.parametrize("softplus,last_state", [(True, False), (False, True)])
def test_scan_matches_reference(form, drop, softplus, last_state):
    inputs = _scan_inputs(form)
    outs, grads = _run(selective_scan_torch, inputs, drop, softplus, last_state)
    ref_outs, ref_grads = _run(selective_scan_ref, inputs, drop, softplus, last_state)
    for o, ref in zip(outs, ref_outs):
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("form", ["fixed", "varying", "grouped"])
def test_scan_matches_reference_complex(form):
    inputs = _scan_inputs(form, complex_a=True, length=16)
    outs, grads = _run(selective_scan_torch, inputs, (), True, True)
    ref_outs, ref_grads = _run(selective_scan_ref, inputs, (), True, True)
    for o, ref in zip(outs, ref_outs):
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)


def test_scan_keeps_input_dtype():
    inputs = _scan_inputs("varying", length=8)
    u = inputs.pop("u").to(torch.bfloat16)
    assert selective_scan_torch(u, **inputs).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
#                                       load_mamba
# --------------------------------------------------------------------------------------------

def test_load_is_idempotent_and_patches_only_without_kernels():
    assert load_mamba() is SSM
    patched = SSM.mamba_simple.selective_scan_fn is selective_scan_torch
    assert patched == SSM.fallback
    if not torch.cuda.is_available():
        assert SSM.fallback


def test_missing_mamba_ssm_names_install_command(monkeypatch):
    monkeypatch.setattr(mamba_compat, "_loaded", None)
    monkeypatch.setattr(mamba_compat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE"):
        load_mamba()


@pytest.mark.slow
def test_full_package_still_importable():
    import mamba_ssm  # the package __init__ (Mamba2, Mamba3, ...) runs here: a few seconds

    assert mamba_ssm.Mamba is SSM.mamba_simple.Mamba
    assert mamba_ssm.__version__


# --------------------------------------------------------------------------------------------
#                                       DiM backbone
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("DiM-T/2").to(DEVICE)


def test_layers_are_mamba_ssm_blocks(model):
    assert isinstance(model, DiM) and isinstance(model.layers, torch.nn.ModuleList)
    assert len(model.layers) == 6
    assert all(type(layer) is Block for layer in model.layers)
    assert all(type(layer.mixer) is SSM.mamba_simple.Mamba for layer in model.layers)


@pytest.mark.parametrize("batch", [2, 3])
def test_forward_shape(model, batch):
    x, t, y = example_inputs(model, batch=batch)
    assert model(x, t, y).shape == (batch, 4, 8, 8) == x.shape


def test_gradients_reach_every_parameter(model):
    model.zero_grad(set_to_none=True)
    model(*example_inputs(model)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_eval_output_is_deterministic(model):
    model.eval()
    try:
        inputs = example_inputs(model, batch=3)
        with torch.no_grad():
            assert torch.equal(model(*inputs), model(*inputs))
    finally:
        model.train()


def test_unknown_size_name():
    with pytest.raises(ValueError, match="DiM-T/2"):
        build_model("DiM-XL/2")


def test_registered_in_backbones():
    from routefx import backbones

    assert set(backbones.Mamba_models) == {"DiM-T/2", "DiM-S/2", "DiM-B/2"}
    model = backbones.create("DiM-T/2")
    assert model(*backbones.example_inputs(model, batch=2)).shape == (2, 4, 8, 8)
