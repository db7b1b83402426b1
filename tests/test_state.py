"""State and memory tricks: state_dict both ways, deepcopy, save/load, .to(), optimizers,
activation checkpointing, frozen blocks, no_grad, determinism, ratio schedules."""
import copy
import gc
import io
import weakref

import pytest
import torch
import torch.utils.checkpoint as cp

import routefx
from helpers import dit_inputs, tiny_dit, tread_dit


def test_state_dict_round_trips_both_ways():
    routed = routefx.apply(tiny_dit(seed=0), [(1, 4, 0.5)])
    plain = tiny_dit(seed=1)
    routed.load_state_dict(plain.state_dict())           # plain -> routed
    assert all(torch.equal(a, b) for a, b in zip(routed.state_dict().values(), plain.state_dict().values()))
    other = tiny_dit(seed=2)
    other.load_state_dict(routed.state_dict())            # routed -> plain, strict
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), plain.state_dict().values()))
    holder = torch.nn.Sequential(routed)                  # nested: keys keep the parent's prefix only
    assert list(holder.state_dict()) == ["0." + k for k in plain.state_dict()]
    holder.load_state_dict({"0." + k: v for k, v in plain.state_dict().items()})


def test_deepcopy_and_torch_save_of_routed_model():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed(*dit_inputs(2))                                # captured graph exists
    twin = copy.deepcopy(routed)
    assert twin is not model and routefx.router(twin)._graphs == [] and routefx.router(twin).model is twin
    buf = io.BytesIO()
    torch.save(routed, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded):
        torch.manual_seed(0)
        a = m(*dit_inputs(3))
        torch.manual_seed(0)
        b = routed(*dit_inputs(3))
        assert torch.equal(a, b)
        assert routefx.router(m).routes == routefx.router(routed).routes


def test_to_dtype_after_apply_reads_the_new_tensors():
    """The graph reads the model's parameters and buffers where they are at run time: after
    `.to()` there and back (new buffer objects), a routed step equals a fresh apply's."""
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed(*dit_inputs(2))
    routed.to(torch.float64)
    routed.to(torch.float32)
    x, t, y = dit_inputs(2)
    torch.manual_seed(0)
    got = routed(x, t, y)
    fresh = routefx.apply(copy.deepcopy(model), [(1, 4, 0.5)])
    torch.manual_seed(0)
    assert got.dtype == torch.float32 and torch.equal(got, fresh(x, t, y))


def test_optimizer_made_before_apply_still_trains():
    model = tiny_dit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    routed = routefx.apply(model, [(1, 4, 0.5)])
    before = model.blocks[2].attn.qkv.weight.detach().clone()
    routed(*dit_inputs(2)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.blocks[2].attn.qkv.weight)


class Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, c):
        return cp.checkpoint(self.block, x, c, use_reentrant=False)


def test_activation_checkpointing_same_loss_and_grads():
    x, t, y = dit_inputs(3)
    results = []
    for wrap in (False, True):
        model = tiny_dit()
        if wrap:  # checkpointing applied inside the blocks of the model routefx sees
            model.blocks = torch.nn.ModuleList(Checkpointed(b) for b in model.blocks)
        routed = routefx.apply(model, [(1, 4, 0.5)])
        torch.manual_seed(0)
        loss = routed(x, t, y).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-7) and len(g0) == len(g1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def _wrap_blocks_in_checkpointing(module):
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    from routefx.backbones.dit import DiTBlock
    apply_activation_checkpointing(module, check_fn=lambda m: isinstance(m, DiTBlock),
                                   checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                 checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def _step_counting_recomputes(routed, model):
    """One training step; returns (loss, grads, number of block forwards run during backward)."""
    from routefx.backbones.dit import DiTBlock
    calls = [0]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for m in model.modules() if isinstance(m, DiTBlock)]
    torch.manual_seed(0)
    loss = routed(*dit_inputs(3)).square().mean()
    before = calls[0]
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, calls[0] - before


def test_activation_checkpointing_applied_after_apply():
    """torch's apply_activation_checkpointing on the ROUTED module, before its first call: the
    blocks are recomputed in backward, numbers and state_dict keys unchanged."""
    ref_model = tiny_dit()
    loss0, grads0, recomputed0 = _step_counting_recomputes(routefx.apply(ref_model, [(1, 4, 0.5)]), ref_model)
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    _wrap_blocks_in_checkpointing(routed)
    loss1, grads1, recomputed1 = _step_counting_recomputes(routed, model)
    assert (recomputed0, recomputed1) == (0, len(model.blocks)), "every block recomputed in backward"
    assert torch.allclose(loss0, loss1, atol=1e-7) and grads0.keys() == grads1.keys()
    assert all(torch.allclose(grads0[k], grads1[k], atol=1e-6) for k in grads0)
    assert list(routed.state_dict()) == list(ref_model.state_dict()), "checkpoint keys unchanged"


def test_activation_checkpointing_applied_after_the_first_step_takes_effect():
    """Was bug C: the wrapping replaces the blocks, so the next call recaptures around them."""
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    loss0, grads0, _ = _step_counting_recomputes(routed, model)  # captures the graph
    old = weakref.ref(routefx.router(routed)._graphs[0][1].gm)
    _wrap_blocks_in_checkpointing(routed)
    loss1, grads1, recomputed = _step_counting_recomputes(routed, model)
    assert recomputed == len(model.blocks)
    assert torch.allclose(loss0, loss1, atol=1e-7) and grads0.keys() == grads1.keys()
    assert all(torch.allclose(grads0[k], grads1[k], atol=1e-6) for k in grads0)
    gc.collect()
    assert len(routefx.router(routed)._graphs) == 1 and old() is None, "the stale graph is dropped, not kept alive"


def test_activation_checkpointing_after_the_first_step_workaround_reapply():
    """The former workaround for bug C still works: re-apply after wrapping."""
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    loss0, grads0, _ = _step_counting_recomputes(routed, model)
    _wrap_blocks_in_checkpointing(routed)
    routed = routefx.apply(routefx.remove(routed), [(1, 4, 0.5)])
    loss1, grads1, recomputed = _step_counting_recomputes(routed, model)
    assert recomputed == len(model.blocks)
    assert torch.allclose(loss0, loss1, atol=1e-7)
    assert all(torch.allclose(grads0[k], grads1[k], atol=1e-6) for k in grads0)


def _perturbed(module, seed=5):
    twin = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return twin


def _replace_block(model):
    model.blocks[2] = _perturbed(model.blocks[2])            # ModuleList.__setitem__


def _append_block(model):
    model.blocks.append(_perturbed(model.blocks[-1]))        # the chain grows to 7 blocks


def _replace_traced_linear(model):
    model.final_layer.linear = _perturbed(model.final_layer.linear)  # a leaf in inlined code


def _replace_embedder(model):
    model.t_embedder = _perturbed(model.t_embedder)          # a module the trace went into


def _replace_parameter(model):
    model.pos_embed = torch.nn.Parameter(model.pos_embed.detach() * -2, requires_grad=False)  # get_attr


@pytest.mark.parametrize("edit", [_replace_block, _append_block, _replace_traced_linear, _replace_embedder,
                                  _replace_parameter])
def test_module_or_parameter_replaced_after_the_first_step_is_used(edit):
    """Was bug C: the next routed step recaptures and equals a fresh apply of the edited model."""
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    torch.manual_seed(0)
    before = routed(*dit_inputs(3))
    edit(model)
    gc.collect()
    torch.manual_seed(0)
    after = routed(*dit_inputs(3))
    torch.manual_seed(0)
    fresh = routefx.apply(model, [(1, 4, 0.5)])(*dit_inputs(3))
    assert not torch.allclose(before, after), "the edit changes the output"
    assert torch.equal(after, fresh)
    assert len(routefx.router(routed)._graphs) == 1


def test_changes_inside_a_leaf_or_no_change_keep_the_graph():
    """Leaf blocks run live (a LoRA-like swap inside one is seen without recapture); re-assigning
    the same module, or building unrelated modules, keeps the captured graph."""
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed(*dit_inputs(2))
    rg = routefx.router(routed)._graphs[0][1]
    model.blocks[2] = model.blocks[2]
    model.pos_embed = model.pos_embed
    torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    model.blocks[2].attn.qkv = _perturbed(model.blocks[2].attn.qkv)
    torch.manual_seed(0)
    out = routed(*dit_inputs(2))
    assert routefx.router(routed)._graphs == [(routefx.router(routed)._graphs[0][0], rg)], "no recapture"
    torch.manual_seed(0)
    assert torch.equal(out, tread_dit(model, *dit_inputs(2), [routefx.Route(1, 4, 0.5)]))


def test_block_replaced_after_the_first_compiled_step_is_used():
    """Bug C under `torch.compile(routed)`: the replacement recompiles around the new block."""
    torch._dynamo.reset()
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    compiled = torch.compile(routed, backend="eager")
    torch.manual_seed(0)
    before = compiled(*dit_inputs(3))
    _replace_block(model)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(compiled(*dit_inputs(3)))
    torch.manual_seed(0)
    fresh = routefx.apply(model, [(1, 4, 0.5)])(*dit_inputs(3))
    assert not torch.allclose(before, fresh)
    assert all(torch.allclose(o, fresh, atol=1e-6) for o in outs)
    torch._dynamo.reset()


def test_frozen_blocks_and_no_grad_training_forward():
    model = tiny_dit()
    for p in model.blocks[:3].parameters():
        p.requires_grad_(False)
    routed = routefx.apply(model, [(1, 4, 0.5)])
    routed(*dit_inputs(2)).square().mean().backward()
    assert all(p.grad is None for p in model.blocks[:3].parameters())
    assert all(p.grad is not None for p in model.blocks[3:].parameters())
    with torch.no_grad():
        torch.manual_seed(0)
        out = routed(*dit_inputs(2))
    torch.manual_seed(0)
    assert torch.equal(out, tread_dit(model, *dit_inputs(2), [routefx.Route(1, 4, 0.5)]).detach())


def test_seeded_generator_is_bit_reproducible():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        routed = routefx.apply(tiny_dit(), [(1, 4, 0.5)], generator=torch.Generator().manual_seed(3))
        outs.append((routed(*dit_inputs(4)), routefx.router(routed).routing[0].ids))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_ratio_schedule_between_steps_matches_reference():
    model = tiny_dit()
    routed = routefx.apply(model, [(1, 4, 0.5)])
    for ratio in (0.25, 0.5, 0.0, 0.75):
        routefx.router(routed).set_ratio(ratio)
        torch.manual_seed(1)
        out = routed(*dit_inputs(2))
        torch.manual_seed(1)
        assert torch.allclose(out, tread_dit(model, *dit_inputs(2), [routefx.Route(1, 4, ratio)]), atol=1e-6)
    assert len(routefx.router(routed)._graphs) == 1, "a ratio change reuses the graph"
    with pytest.raises(routefx.RouteError, match="ratio"):
        routefx.router(routed).set_ratio(1.5)
