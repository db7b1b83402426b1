"""Reference backbones: shapes, adaLN-Zero init, label dropout, long skips, gradients."""

import pytest
import torch
import torch.nn as nn

from routefx import backbones
from routefx.backbones.dit import DiT, LabelEmbedder
from routefx.backbones.uvit import Block, UViT

# Sizes cheap enough to build on a CPU; B, L, XL and U-ViT-M are never built here.
SMALL = [n for n in backbones.names() if n.startswith(("DiT", "SiT", "U-ViT"))
         and n.split("-")[-1].split("/")[0] in ("T", "S")]
SMALL_KW = {"DiT": {"input_size": 16}, "SiT": {"input_size": 16}, "U-ViT": {}}


def _small(name, **kw):
    torch.manual_seed(0)
    return backbones.create(name, **SMALL_KW[name.rsplit("-", 1)[0]], **kw)


def _perturb(model, std=0.02):
    """Moves every trainable weight off its init, so zero-initialised layers do something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model


def _expected_shape(model, batch):
    if isinstance(model, DiT):
        return (batch, model.out_channels, model.input_size, model.input_size)
    return (batch, model.in_chans, model.img_size, model.img_size)


# --------------------------------------------------------------------------- registry

def test_registry_covers_all_families():
    names = backbones.names()
    assert names == sorted(backbones.MODELS)
    for name in ("DiT-XL/2", "DiT-S/8", "DiT-T/2", "SiT-XL/2", "SiT-T/2",
                 "U-ViT-S/2", "U-ViT-M/2", "U-ViT-T/2"):
        assert name in names
    assert set(backbones.Mamba_models) <= set(names)
    assert {"DiT-T/2", "DiT-S/2", "SiT-S/4", "U-ViT-T/2", "U-ViT-S/2"} <= set(SMALL)


def test_create_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"DiT-XL/2.*U-ViT-S/2"):
        backbones.create("DiT-XXL/2")


def test_example_inputs_rejects_unregistered_model():
    with pytest.raises(TypeError, match="not a registered backbone"):
        backbones.example_inputs(nn.Linear(2, 2))


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", SMALL)
def test_forward_shape(name):
    model = _small(name).eval()
    with torch.no_grad():
        for batch in (2, 3):
            out = model(*backbones.example_inputs(model, batch=batch))
            assert out.shape == _expected_shape(model, batch)


def test_sit_predicts_one_field_and_dit_learns_sigma():
    assert _small("SiT-T/2").out_channels == 4
    assert _small("DiT-T/2").out_channels == 8
    assert _small("DiT-T/2", learn_sigma=False).out_channels == 4


# --------------------------------------------------------------------------- DiT

def test_dit_adaln_zero_output_is_exactly_zero():
    model = _small("DiT-T/2")
    for training in (True, False):
        out = model.train(training)(*backbones.example_inputs(model, batch=2))
        assert torch.equal(out, torch.zeros_like(out))


def test_dit_pos_embed_is_fixed_sincos():
    model = _small("DiT-T/2")
    assert not model.pos_embed.requires_grad
    assert model.pos_embed.shape == (1, model.x_embedder.num_patches, 64)
    assert model.pos_embed.abs().max() <= 1.0 and model.pos_embed.std() > 0.1


def test_label_dropout_only_in_train_mode():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    labels = torch.randint(0, 10, (2000,))
    null = emb.embedding_table.weight[10]
    dropped = (emb(labels, train=True) == null).all(dim=1)
    assert 0.4 < dropped.float().mean() < 0.6
    assert not (emb(labels, train=False) == null).all(dim=1).any()
    forced = emb(labels[:4], train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal((forced == null).all(dim=1), torch.tensor([True, False, True, False]))


def test_dit_train_mode_drops_labels_eval_mode_is_deterministic():
    model = _perturb(_small("DiT-T/2", class_dropout_prob=1.0))
    x, t, y = backbones.example_inputs(model, batch=2)
    other_y = (y + 1) % model.num_classes
    model.train()
    assert torch.equal(model(x, t, y), model(x, t, other_y))  # every label dropped
    model.eval()
    with torch.no_grad():
        out = model(x, t, y)
        assert torch.equal(out, model(x, t, y))
        assert not torch.allclose(out, model(x, t, other_y))


def test_dit_forward_with_cfg():
    model = _perturb(_small("DiT-T/2")).eval()
    x, t, y = backbones.example_inputs(model, batch=4)
    y[2:] = model.num_classes  # null class for the unconditional half
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        assert out.shape == _expected_shape(model, 4)
        c = model.in_channels
        assert torch.equal(out[:2, :c], out[2:, :c])
        plain = model.forward_with_cfg(x, t, y, cfg_scale=1.0)[:2]
        cond = model(x[:2], t[:2], y[:2])
        torch.testing.assert_close(plain, cond, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- U-ViT

def test_uvit_long_skip_structure():
    model = _small("U-ViT-T/2")
    assert (len(model.in_blocks), len(model.out_blocks)) == (3, 3)
    blocks = [*model.in_blocks, model.mid_block, *model.out_blocks]
    assert all(type(b) is Block for b in blocks)
    assert [b.skip_linear is not None for b in blocks] == [False] * 4 + [True] * 3
    assert model.extras == 2
    assert model.pos_embed.shape == (1, 2 + (16 // 2) ** 2, 64)


def test_uvit_eval_is_deterministic_and_uses_label():
    model = _small("U-ViT-T/2").eval()
    x, t, y = backbones.example_inputs(model, batch=2)
    with torch.no_grad():
        out = model(x, t, y)
        assert torch.equal(out, model(x, t, y))
        assert not torch.allclose(out, model(x, t, (y + 1) % model.num_classes))


def test_uvit_unconditional():
    model = _small("U-ViT-T/2", num_classes=-1, conv=False).eval()
    x, t, y = backbones.example_inputs(model, batch=3)
    assert y is None and model.extras == 1
    with torch.no_grad():
        assert model(x, t).shape == (3, 4, 16, 16)


# --------------------------------------------------------------------------- gradients

def _train_steps(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(*backbones.example_inputs(model, batch=2))
        (out - torch.randn_like(out)).square().mean().backward()
        opt.step()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, steps", [("DiT-T/2", 3), ("SiT-T/2", 3), ("U-ViT-T/2", 1)])
def test_gradient_reaches_every_parameter(name, steps):
    # adaLN-Zero opens one layer per step: final linear, then the modulations, then the blocks.
    grads = _train_steps(_small(name), steps)
    missing = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"
