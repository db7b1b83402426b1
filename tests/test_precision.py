"""Precision: autocast, the fp32 block after a route end, float64 models."""
import torch

import routefx
from helpers import dit_inputs, tiny_dit, tread_dit


def test_bf16_autocast_close_to_float32_at_same_indices():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    x, t, y = dit_inputs(4)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = routed(x, t, y)
    ids_low = routed.routing[0].ids
    torch.manual_seed(0)
    ref = routed(x, t, y)
    assert torch.equal(ids_low, routed.routing[0].ids)
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
