"""Issue 14, item 4: peft LoRA and accelerate with routing on.

LoRA injected after `apply`, before it (routing the inner model), or routing the PeftModel
itself: the routed step equals the hand-written TREAD forward over the same LoRA model at the same
tokens, only the adapters get gradients, and `save_pretrained` / `from_pretrained` round-trips a
non-empty adapter. accelerate: `prepare`, `save_state` / `load_state` with the routing state
registered, then the same tokens and losses as an uninterrupted run; `accumulate()`."""
import pytest
import torch
from safetensors.torch import load_file

import routefx
from helpers import dit_inputs, tiny_dit, tread_dit

peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")
ROUTE = (1, 4, 0.5)
TARGETS = ["qkv", "proj", "fc1", "fc2", "linear"]  # block Linears, x_embedder.proj, final_layer.linear


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test makes its own Accelerator."""
    yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def _lora(model):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def _routed_lora(order, seed=0):
    model = tiny_dit(seed=seed)
    if order == "after":
        routefx.apply(model, [ROUTE])
        return model, _lora(model)
    pm = _lora(model)
    routefx.apply(pm if order == "peft_model" else pm.get_base_model(), [ROUTE])
    return model, pm


@pytest.mark.parametrize("order", ["after", "before", "peft_model"])
def test_lora_with_routing_matches_the_reference_and_round_trips(order, tmp_path):
    model, pm = _routed_lora(order)
    x, t, y = dit_inputs(3)
    torch.manual_seed(0)
    out = pm(x, t, y)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads), "only the adapters train"
    pm.zero_grad()
    torch.manual_seed(0)  # (tread_dit calls the LoRA-injected submodules itself)
    ref = tread_dit(model, x, t, y, routefx.route.resolve_routes([ROUTE], 6))
    ref.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    for n, p in pm.named_parameters():
        assert (p.grad is not None) == (n in grads), n
        assert p.grad is None or torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-5), n

    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(saved) == len(lora) == 52, "a full adapter, not an empty file"
    other = tiny_dit()  # the same base weights, fresh (random) adapters replaced by the saved ones
    routefx.apply(other, [ROUTE])
    loaded = peft.PeftModel.from_pretrained(other, tmp_path, is_trainable=True)  # (else eval mode: unrouted)
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, lora[n]), n
    torch.manual_seed(0)
    assert torch.allclose(loaded(x, t, y), out, atol=1e-6)


def _accelerated(tmp, accumulate=1):
    model = tiny_dit()
    routefx.apply(model, [ROUTE], generator=torch.Generator().manual_seed(5))
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate, project_dir=str(tmp))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(routefx.router(model))
    return acc, model, opt


def _train(acc, model, opt, steps, first=0):
    losses, ids = [], []
    for s in range(first, first + steps):
        with acc.accumulate(model):
            loss = model(*dit_inputs(3, seed=s)).square().mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
        ids.append(routefx.router(model).routing[0].ids.tolist())
    return losses, ids


def test_accelerate_save_and_load_state_restore_the_token_selection(tmp_path):
    acc, model, opt = _accelerated(tmp_path)
    _train(acc, model, opt, 2)
    acc.save_state(str(tmp_path / "ckpt"))
    want = _train(acc, model, opt, 3, first=2)
    acc, model, opt = _accelerated(tmp_path)
    acc.load_state(str(tmp_path / "ckpt"))
    got = _train(acc, model, opt, 3, first=2)
    assert got[1] == want[1], "the routing generator came back: the same tokens after the resume"
    assert got[0] == want[0]
    fresh, model, opt = _accelerated(tmp_path)
    assert _train(fresh, model, opt, 1, first=2)[1] != want[1][:1], "(without load_state: other tokens)"


def test_accelerate_accumulate_sums_micro_steps(tmp_path):
    """Two micro-steps under `accumulate()` (gradient_accumulation_steps=2) leave the mean of the
    two routed micro-steps' gradients, as computed by hand."""
    acc, model, opt = _accelerated(tmp_path, accumulate=2)
    opt.step = lambda *a, **k: None  # look at the gradients, not the update
    gen = routefx.router(model).control.generator
    state, rng = gen.get_state(), torch.get_rng_state()  # (routing; the label dropout)
    with acc.accumulate(model):
        acc.backward(model(*dit_inputs(3, seed=0)).square().mean())
    assert not acc.sync_gradients
    with acc.accumulate(model):
        acc.backward(model(*dit_inputs(3, seed=1)).square().mean())
    assert acc.sync_gradients
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    gen.set_state(state)
    torch.set_rng_state(rng)
    for s in (0, 1):
        (model(*dit_inputs(3, seed=s)).square().mean() / 2).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-5), n


def test_accelerate_mixed_precision_wraps_the_routed_forward():
    """prepare() with mixed_precision="bf16" wraps model.forward (autocast, float32 outputs):
    the call still routes, `router` finds the routing under the wrapper, `remove` asks for
    unwrap_model first, and works after it."""
    model = routefx.apply(tiny_dit(), [ROUTE])
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = acc.prepare(model)
    out = model(*dit_inputs(3))  # (the first call captures inside accelerate's autocast decorator)
    assert out.dtype == torch.float32 and routefx.router(model).routing[0].ids.shape == (3, 8)
    assert not torch.is_autocast_enabled("cpu"), "autocast left on: capture re-entered the decorator"
    with pytest.raises(routefx.RouteError, match=r"accelerator.unwrap_model\(model, keep_fp32_wrapper=False\)"):
        routefx.remove(model)
    unwrapped = acc.unwrap_model(model, keep_fp32_wrapper=False)  # (binds the router as a method)
    torch.manual_seed(0)
    again = unwrapped(*dit_inputs(3))
    assert routefx.router(unwrapped).routing[0].ids.shape == (3, 8)
    plain = routefx.remove(unwrapped)
    assert "forward" not in plain.__dict__
    torch.manual_seed(0)
    assert not torch.equal(plain(*dit_inputs(3)), again), "removed: the model's own forward"


def test_lora_fine_tuning_of_a_stock_diffusers_transformer(tmp_path):
    """peft LoRA on the attention projections of diffusers' FluxTransformer2DModel (tiny random
    config), routed after injection: the routed step trains only the adapters, `save_pretrained`
    writes every one of them, and a fresh routed model loading them gives the same routed step."""
    import diffusers_zoo as Z

    def lora_flux():
        model, args, kwargs = Z.build("FluxTransformer2DModel", "text_eq_tokens")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
        return peft.get_peft_model(model, cfg), args, kwargs

    pm, args, kwargs = lora_flux()
    routefx.apply(pm.get_base_model(), [(1, -2, 0.5)])
    torch.manual_seed(0)
    out = Z.sample(pm(*args, **kwargs))
    out.square().mean().backward()
    trained = [n for n, p in pm.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    assert routefx.router(pm).routing[0].ids is not None
    pm.save_pretrained(tmp_path)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == len(trained)
    base, _, _ = Z.build("FluxTransformer2DModel", "text_eq_tokens")  # the same base weights (seeded)
    routefx.apply(base, [(1, -2, 0.5)])
    loaded = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    torch.manual_seed(0)
    assert torch.allclose(Z.sample(loaded(*args, **kwargs)), out, atol=1e-6)
