"""Precision: autocast (bf16, fp16), the fp32 block after a route end, float64 models; on a tiny
DiT against the hand-written reference, then on every backbone family of the registry + a timm ViT."""
import pytest
import torch

import routefx
from routefx import backbones
from routefx.backbones import create, example_inputs
from helpers import dit_inputs, tiny_dit, tread_dit


def test_bf16_autocast_close_to_float32_at_same_indices():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    x, t, y = dit_inputs(4)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = routed(x, t, y)
    ids_low = routefx.router(routed).routing[0].ids
    torch.manual_seed(0)
    ref = routed(x, t, y)
    assert torch.equal(ids_low, routefx.router(routed).routing[0].ids)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_fp32_block_after_route_end():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 3, 0.5)], fp32_after_route=True)
    seen = {}
    model.blocks[4].register_forward_pre_hook(lambda m, a: seen.update(dtype=a[0].dtype,
                                                                       autocast=torch.is_autocast_enabled("cpu")))
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.update(inner=torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routed(*dit_inputs(2))
    assert seen == {"dtype": torch.float32, "autocast": False, "inner": True}
    assert torch.isfinite(out).all()
    torch.manual_seed(0)
    plain = routed(*dit_inputs(2))  # float32: the option changes nothing outside autocast
    torch.manual_seed(0)
    assert torch.allclose(plain, tread_dit(model, *dit_inputs(2), [routefx.Route(1, 3, 0.5)]), atol=1e-6)


class Mixer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x)) + self.norm(x).mean(dim=1, keepdim=True)  # mixes tokens


class Tokens(torch.nn.Module):
    def __init__(self, d=16, depth=5):
        super().__init__()
        self.embed, self.blocks = torch.nn.Linear(4, d), torch.nn.ModuleList(Mixer(d) for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x


def test_float64_model_routes_exactly():
    torch.manual_seed(0)
    model = Tokens().double()
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    routed = routefx.apply(model, [(1, 3, 0.5)])
    torch.manual_seed(0)
    out = routed(x)
    torch.manual_seed(0)
    h = model.embed(x)
    h = model.blocks[0](h)
    ids = torch.rand(3, 10).argsort(1)[:, :5].sort(1).values
    k = h.gather(1, ids[..., None].expand(-1, -1, 16))
    for b in model.blocks[1:4]:
        k = b(k)
    ref = model.blocks[4](h.scatter(1, ids[..., None].expand(-1, -1, 16), k))
    assert out.dtype == torch.float64 and torch.allclose(out, ref, atol=1e-12)


# ============================================================ every backbone family of the registry

def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=10)


FAMILIES = {  # family: (factory, route, block chain of the built model); the smallest sizes
    "DiT": (lambda: create("DiT-T/2", input_size=8, num_classes=10), (1, 4, 0.5), lambda m: list(m.blocks)),
    "SiT": (lambda: create("SiT-T/2", input_size=8, num_classes=10), (0, 3, 0.5), lambda m: list(m.blocks)),
    "U-ViT": (lambda: create("U-ViT-T/2", img_size=8), (1, 5, 0.5),
              lambda m: [*m.in_blocks, m.mid_block, *m.out_blocks]),
    "DiM": (lambda: create("DiM-T/2", depth=4), (1, 2, 0.5), lambda m: list(m.layers)),
    "timm-ViT": (_timm_vit, (1, 4, 0.5), lambda m: list(m.blocks)),
}
# autocast: max |low - float32| / max |float32| allowed (measured ~0.007 bf16, ~0.001 fp16)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
FP64_OK = ["U-ViT", "timm-ViT", "DiT", "SiT"]  # DiM builds float32 timestep features: eager fails in float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(family, dtype=torch.float32):
    factory, route, chain = FAMILIES[family]
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():  # off the zero init (adaLN-Zero, zero heads) so every path carries signal
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype)
    torch.manual_seed(1)
    args = (torch.randn(3, 3, 32, 32),) if family == "timm-ViT" else example_inputs(model, batch=3)
    args = tuple(a.to(dtype) if a is not None and a.is_floating_point() else a for a in args)
    return model, args, route, chain(model)


def test_families_cover_the_registry():
    assert {n.rsplit("-", 1)[0] for n in backbones.names()} == set(FAMILIES) - {"timm-ViT"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_every_backbone_close_to_float32_at_same_indices(family, dtype):
    model, args, route, _ = _build(family)
    routed = routefx.apply(model, [route])
    torch.manual_seed(0)
    ref = routed(*args)
    ids = routefx.router(routed).routing[0].ids
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype):
        low = routed(*args)
    assert torch.equal(routefx.router(routed).routing[0].ids, ids), "autocast must not change the token selection"
    assert low.dtype == dtype and torch.isfinite(low).all()
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE[dtype], f"{family} {dtype}: relative error {err:.3g}"
    low.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_block_after_route_end_every_backbone(family):
    model, args, (start, end, ratio), chain = _build(family)
    routed = routefx.apply(model, [(start, end, ratio)], fp32_after_route=True)
    seen = {}
    hooks = [chain[end + 1].register_forward_pre_hook(
                 lambda m, a: seen.update(dtype=a[0].dtype, autocast=torch.is_autocast_enabled("cpu"))),
             chain[start].register_forward_pre_hook(lambda m, a: seen.update(inner=torch.is_autocast_enabled("cpu")))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routed(*args)
    for h in hooks:
        h.remove()
    assert seen == {"dtype": torch.float32, "autocast": False, "inner": True}, seen
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FP64_OK)
def test_float64_backbone_routes_in_float64(family):
    model, args, route, _ = _build(family, torch.float64)
    routed = routefx.apply(model, [route])
    torch.manual_seed(0)
    out = routed(*args)
    ids = routefx.router(routed).routing[0].ids
    assert out.dtype == torch.float64
    out.square().mean().backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters() if p.grad is not None)
    model32, args32, _, _ = _build(family)
    routed32 = routefx.apply(model32, [route])
    torch.manual_seed(0)
    ref = routed32(*args32)
    assert torch.equal(routefx.router(routed32).routing[0].ids, ids)
    assert (out - ref.double()).abs().max() < 1e-4 * ref.abs().max()
    zero = routefx.apply(model, [(*route[:2], 0.0)])
    torch.manual_seed(0)
    a = zero(*args)
    torch.manual_seed(0)
    assert torch.equal(a, model(*args)), "ratio 0 in float64 is the original forward"


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(FP64_OK)))
def test_float64_not_supported_by_the_model_itself(family):
    """Not a routefx limit: the eager model fails in float64 (kept so the doc stays true)."""
    model, args, _, _ = _build(family, torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        model(*args)


def test_fp32_after_route_keeps_a_float64_model_in_float64():
    torch.manual_seed(0)
    model = Tokens().double()
    routed = routefx.apply(model, [(1, 2, 0.5)], fp32_after_route=True)
    out = routed(torch.randn(3, 10, 4, dtype=torch.float64))
    assert out.dtype == torch.float64
