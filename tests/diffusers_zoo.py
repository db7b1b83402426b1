"""Tiny random configs of stock diffusers (0.42.1) transformer classes, with realistic inputs.

    model, args, kwargs = build("FluxTransformer2DModel", "text8")
    out = model(*args, **kwargs)            # a Transformer2DModelOutput (a BaseOutput: dict AND dataclass)
    y = sample(out)                         # the output tensor (Z-Image's list of samples stacked)

`NAMES` lists every entry: one per class, plus two variants (`SD3.5Transformer2DModel`: SD3 with
dual-attention layers and qk rms-norm; `CogVideoXTransformer3DModel/rope`: the 5B-style model with
rotary tables passed by the pipeline). `TEN` are the classes the routing tests cover.

Every model sees N = 16 image tokens (an 8x8 latent, patch 2; video models: 1 frame), batch 2.
`case` picks which other size collides with N on purpose (`CASES`):

* "text8":            8 text tokens reach the blocks, hidden size 48 (2 heads x 24). Every other
                      size differs from N and from each other where it can, so no tensor but the
                      image stream has a (batch, 16, ...) shape by coincidence.
* "text_eq_tokens":   the text stream the blocks see is N = 16 tokens long (same shape as the image
                      stream in joint-attention models): it must still never be routed.
* "hidden_eq_tokens": the hidden size is N = 16 (2 heads x 8), text 8: conditioning vectors are
                      (batch, 16), token tensors (batch, 16, 16).

"Text tokens the blocks see" counts what enters the blocks: HunyuanDiT concatenates two encoders
(half each), AuraFlow prepends its 8 register tokens (text8: 6 text + 8 registers = 14, so that the
text stream is not 16 long too; text_eq_tokens: 8 + 8 = 16).

Nothing is downloaded; CPU, float32; building and running one takes well under a second.
Deterministic: the weights come from `torch.manual_seed(seed)`, the inputs from a separate
`torch.Generator` seeded with `seed`. Models are returned in train mode (DiT then drops class
labels at random, in every block: seed the global RNG before comparing two forwards).

Parameters that the class initialises to all zeros get small random values (`_unzero`), so
outputs and gradients are not trivially zero, and `build` checks that every output projection
(`proj_out*`, `norm_out.linear`, ...) has a nonzero weight. `ZEROED[(name, case)]` lists what was
re-initialised.
"""
import dataclasses

import torch

__all__ = ["build", "sample", "block_names", "dims", "NAMES", "TEN", "MORE", "SKIP", "CASES", "BLOCKS", "ZEROED", "inputs_only"]

CASES = ("text8", "text_eq_tokens", "hidden_eq_tokens")
ZEROED: dict = {}


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes of one case. `T` = text tokens the blocks see; `DH` x `H` = hidden size."""

    case: str
    B: int = 2      # batch
    HW: int = 8     # latent side
    P: int = 2      # patch
    T: int = 8      # text tokens reaching the blocks
    H: int = 2      # attention heads
    DH: int = 24    # head dim
    DT: int = 40    # text-encoder feature dim
    DP: int = 20    # pooled text dim
    DE: int = 36    # time-embedding dim (where it is a separate size)
    DL: int = 28    # llama feature dim (HiDream)

    @property
    def N(self):    # image tokens
        return (self.HW // self.P) ** 2

    @property
    def D(self):    # hidden size
        return self.H * self.DH

    def rope3(self):
        """Three rotary axis dims (even) summing to the head dim: (4, 10, 10) for 24, (2, 2, 4) for 8."""
        return (4, 10, 10) if self.DH == 24 else (2, 2, 4)


def dims(case: str) -> Dims:
    if case == "text8":
        return Dims(case)
    if case == "text_eq_tokens":
        return Dims(case, T=16)
    if case == "hidden_eq_tokens":
        return Dims(case, DH=8)
    raise ValueError(f"unknown case {case!r}; one of {CASES}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _unzero(model, seed, std=0.02):
    """Re-initialise every parameter that is exactly zero everywhere (biases excepted) with N(0, std)."""
    g = _gen(seed + 1)
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not p.any() and not name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                done.append(name)
    return done


_OUT_PROJ = ("proj_out", "proj_out_1", "proj_out_2", "norm_out.linear", "final_layer", "norm_out.linear_1",
             "linear_out")


def _check_output_projections(model, name):
    """The layers that make the output must carry signal (diffusers 0.42.1 does not zero-init them at
    construction; `_unzero` would fix an all-zero one): fail loudly if one is zero anyway."""
    for mname, m in model.named_modules():
        if mname in _OUT_PROJ:
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor):
                assert w.abs().max() > 0, f"{name}: output projection {mname} is all zero"


def _grid_ids(h, w, frame=0):
    """Flux-style position ids (h*w, 3): (frame/offset, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = frame
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _packed(g, d, c=3):
    """(B, N, c*P*P) 2x2-packed latents, as Flux / Chroma / QwenImage pipelines pass them (c=3: 12
    channels, not 16 = N)."""
    x = _randn(g, d.B, c, d.HW, d.HW)
    x = x.view(d.B, c, d.HW // d.P, d.P, d.HW // d.P, d.P).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(d.B, d.N, c * d.P * d.P)


# --------------------------------------------------------------------------------------------
# one function per class: d -> (config dict, inputs function g -> (args, kwargs))

def _dit(d):
    cfg = dict(num_attention_heads=d.H, attention_head_dim=d.DH, in_channels=4, out_channels=4, num_layers=4,
               sample_size=d.HW, patch_size=d.P, num_embeds_ada_norm=10, norm_type="ada_norm_zero")

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW),), dict(timestep=torch.randint(0, 1000, (d.B,), generator=g),
                                                      class_labels=torch.randint(0, 10, (d.B,), generator=g))
    return cfg, inputs


def _pixart(d):
    cfg = dict(num_attention_heads=d.H, attention_head_dim=d.DH, in_channels=4, out_channels=8, num_layers=4,
               cross_attention_dim=d.D, sample_size=d.HW, patch_size=d.P, caption_channels=d.DT,
               use_additional_conditions=False, norm_type="ada_norm_single", num_embeds_ada_norm=1000)

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW),), dict(
            encoder_hidden_states=_randn(g, d.B, d.T, d.DT), timestep=torch.randint(0, 1000, (d.B,), generator=g),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return cfg, inputs


def _sd3(d, dual=()):
    cfg = dict(sample_size=d.HW, patch_size=d.P, in_channels=4, num_layers=4, attention_head_dim=d.DH,
               num_attention_heads=d.H, joint_attention_dim=d.DT, caption_projection_dim=d.D,
               pooled_projection_dim=d.DP, out_channels=4, pos_embed_max_size=16,
               dual_attention_layers=dual, qk_norm="rms_norm" if dual else None)

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW),), dict(
            encoder_hidden_states=_randn(g, d.B, d.T, d.DT), pooled_projections=_randn(g, d.B, d.DP),
            timestep=torch.rand(d.B, generator=g) * 1000)
    return cfg, inputs


def _flux(d):
    cfg = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=d.DH,
               num_attention_heads=d.H, joint_attention_dim=d.DT, pooled_projection_dim=d.DP,
               guidance_embeds=False, axes_dims_rope=d.rope3())

    def inputs(g):
        return (), dict(hidden_states=_packed(g, d), encoder_hidden_states=_randn(g, d.B, d.T, d.DT),
                        pooled_projections=_randn(g, d.B, d.DP), timestep=torch.rand(d.B, generator=g),
                        img_ids=_grid_ids(d.HW // d.P, d.HW // d.P), txt_ids=torch.zeros(d.T, 3))
    return cfg, inputs


def _chroma(d):
    cfg = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=d.DH,
               num_attention_heads=d.H, joint_attention_dim=d.DT, axes_dims_rope=d.rope3(),
               approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)

    def inputs(g):
        return (), dict(hidden_states=_packed(g, d), encoder_hidden_states=_randn(g, d.B, d.T, d.DT),
                        timestep=torch.rand(d.B, generator=g),
                        img_ids=_grid_ids(d.HW // d.P, d.HW // d.P), txt_ids=torch.zeros(d.T, 3))
    return cfg, inputs


def _hunyuan_dit(d):
    # 6 blocks: blocks 4, 5 take long skips from blocks 1, 0 (U-ViT style). The blocks see the two
    # encoders concatenated: T // 2 tokens each.
    t = d.T // 2
    cfg = dict(num_attention_heads=d.H, attention_head_dim=d.DH, in_channels=4, patch_size=d.P, sample_size=d.HW,
               hidden_size=d.D, num_layers=6, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=d.DT,
               cross_attention_dim_t5=d.DT, pooled_projection_dim=d.DP, text_len=t, text_len_t5=t,
               use_style_cond_and_image_meta_size=True)

    def inputs(g):
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        side = d.HW // d.P
        # what HunyuanDiTPipeline passes: rotary (cos, sin) tables (N, head_dim) for the patch grid
        rope = get_2d_rotary_pos_embed(d.DH, ((0, 0), (side, side)), (side, side))
        return (_randn(g, d.B, 4, d.HW, d.HW),), dict(
            timestep=torch.rand(d.B, generator=g) * 1000,
            encoder_hidden_states=_randn(g, d.B, t, d.DT), text_embedding_mask=torch.ones(d.B, t, dtype=torch.long),
            encoder_hidden_states_t5=_randn(g, d.B, t, d.DT),
            text_embedding_mask_t5=torch.ones(d.B, t, dtype=torch.long),
            image_meta_size=torch.tensor([[d.HW * 8, d.HW * 8, d.HW * 8, d.HW * 8, 0, 0]] * d.B, dtype=torch.float),
            style=torch.zeros(d.B, dtype=torch.long), image_rotary_emb=rope)
    return cfg, inputs


AURA_REGISTERS = 8  # AuraFlowTransformer2DModel.register_tokens: (1, 8, D), prepended to the text


def _auraflow(d):
    cfg = dict(sample_size=d.HW, patch_size=d.P, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
               attention_head_dim=d.DH, num_attention_heads=d.H, joint_attention_dim=d.DT,
               caption_projection_dim=d.D, out_channels=4, pos_embed_max_size=64)
    # the blocks see [8 registers, text]: text8 -> 6 text (14 in all, not N); text_eq_tokens -> 8 (16 = N)
    t = 6 if d.T == 8 else d.T - AURA_REGISTERS

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW),), dict(encoder_hidden_states=_randn(g, d.B, t, d.DT),
                                                      timestep=torch.rand(d.B, generator=g) * 1000)
    return cfg, inputs


def _cogview4(d):
    cfg = dict(patch_size=d.P, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=d.DH,
               num_attention_heads=d.H, text_embed_dim=d.DT, time_embed_dim=d.DE, condition_dim=8,
               pos_embed_max_size=16, sample_size=d.HW, rope_axes_dim=(8, 8))

    def inputs(g):
        size = torch.tensor([[d.HW * 8, d.HW * 8]] * d.B, dtype=torch.float)
        return (_randn(g, d.B, 4, d.HW, d.HW), _randn(g, d.B, d.T, d.DT), torch.randint(0, 1000, (d.B,), generator=g),
                size, size.clone(), torch.zeros(d.B, 2)), {}
    return cfg, inputs


def _wan(d):
    cfg = dict(patch_size=(1, d.P, d.P), num_attention_heads=d.H, attention_head_dim=d.DH, in_channels=4,
               out_channels=4, text_dim=d.DT, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    def inputs(g):
        return (_randn(g, d.B, 4, 1, d.HW, d.HW), torch.randint(0, 1000, (d.B,), generator=g),
                _randn(g, d.B, d.T, d.DT)), {}
    return cfg, inputs


def _ltx(d):
    # LTX takes already patchified tokens (B, F*H*W, C) plus the grid size as Python ints
    side = d.HW // d.P
    cfg = dict(in_channels=12, out_channels=12, patch_size=1, patch_size_t=1, num_attention_heads=d.H,
               attention_head_dim=d.DH, cross_attention_dim=d.D, num_layers=4, caption_channels=d.DT,
               qk_norm="rms_norm_across_heads")

    def inputs(g):
        return (), dict(hidden_states=_randn(g, d.B, d.N, 12), encoder_hidden_states=_randn(g, d.B, d.T, d.DT),
                        timestep=torch.randint(0, 1000, (d.B,), generator=g),
                        encoder_attention_mask=torch.ones(d.B, d.T, dtype=torch.long),
                        num_frames=1, height=side, width=side)
    return cfg, inputs


def _qwenimage(d):
    cfg = dict(patch_size=d.P, in_channels=12, out_channels=3, num_layers=4, attention_head_dim=d.DH,
               num_attention_heads=d.H, joint_attention_dim=d.DT, guidance_embeds=False,
               axes_dims_rope=d.rope3())

    def inputs(g):
        side = d.HW // d.P
        return (), dict(hidden_states=_packed(g, d), encoder_hidden_states=_randn(g, d.B, d.T, d.DT),
                        encoder_hidden_states_mask=torch.ones(d.B, d.T, dtype=torch.long),
                        timestep=torch.rand(d.B, generator=g), img_shapes=[[(1, side, side)]] * d.B)
    return cfg, inputs


def _lumina2(d):
    cfg = dict(sample_size=d.HW, patch_size=d.P, in_channels=4, hidden_size=d.D, num_layers=4, num_refiner_layers=2,
               num_attention_heads=d.H, num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
               axes_dim_rope=d.rope3(), axes_lens=(64, 32, 32), cap_feat_dim=d.DT)

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW), torch.rand(d.B, generator=g), _randn(g, d.B, d.T, d.DT),
                torch.ones(d.B, d.T, dtype=torch.bool)), {}
    return cfg, inputs


def _sana(d):
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=d.H, attention_head_dim=d.DH, num_layers=4,
               num_cross_attention_heads=d.H, cross_attention_head_dim=d.DH, cross_attention_dim=d.D,
               caption_channels=d.DT, mlp_ratio=2.5, sample_size=d.HW, patch_size=d.P)

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW), _randn(g, d.B, d.T, d.DT),
                torch.randint(0, 1000, (d.B,), generator=g)), {}
    return cfg, inputs


def _cogvideox(d, rope=False):
    # rope=False: CogVideoX-2b (learned sincos positions); rope=True: CogVideoX-5b style, the pipeline
    # passes 3D rotary (cos, sin) tables of shape (N, head_dim) as `image_rotary_emb`. The 3D rope splits
    # head_dim as 1/4 t + 3/8 h + 3/8 w: head_dim 32 (2 heads), or 16 (1 head) when the hidden size is 16
    heads, dh = (d.H, d.DH) if not rope else ((2, 32) if d.D != 16 else (1, 16))
    cfg = dict(num_attention_heads=heads, attention_head_dim=dh, in_channels=4, out_channels=4, time_embed_dim=d.DE,
               text_embed_dim=d.DT, num_layers=4, sample_width=d.HW, sample_height=d.HW, sample_frames=1,
               patch_size=d.P, temporal_compression_ratio=4, max_text_seq_length=d.T,
               use_rotary_positional_embeddings=rope)

    def inputs(g):
        # CogVideoX latents are (B, F, C, H, W)
        kw = {}
        if rope:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            side = d.HW // d.P
            kw["image_rotary_emb"] = get_3d_rotary_pos_embed(embed_dim=dh, crops_coords=((0, 0), (side, side)),
                                                             grid_size=(side, side), temporal_size=1)
        return (_randn(g, d.B, 1, 4, d.HW, d.HW), _randn(g, d.B, d.T, d.DT),
                torch.randint(0, 1000, (d.B,), generator=g)), kw
    return cfg, inputs


def _hunyuan_video(d):
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=d.H, attention_head_dim=d.DH, num_layers=2,
               num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=d.P, patch_size_t=1,
               guidance_embeds=True, text_embed_dim=d.DT, pooled_projection_dim=d.DP, rope_axes_dim=d.rope3())

    def inputs(g):
        return (), dict(hidden_states=_randn(g, d.B, 4, 1, d.HW, d.HW),
                        timestep=torch.randint(0, 1000, (d.B,), generator=g),
                        encoder_hidden_states=_randn(g, d.B, d.T, d.DT),
                        encoder_attention_mask=torch.ones(d.B, d.T, dtype=torch.long),
                        pooled_projections=_randn(g, d.B, d.DP), guidance=torch.full((d.B,), 3500.0))
    return cfg, inputs


def _mochi(d):
    cfg = dict(patch_size=d.P, num_attention_heads=d.H, attention_head_dim=d.DH, num_layers=4,
               pooled_projection_dim=d.DP, in_channels=4, qk_norm="rms_norm", text_embed_dim=d.DT,
               time_embed_dim=d.DE, activation_fn="swiglu", max_sequence_length=d.T)

    def inputs(g):
        return (_randn(g, d.B, 4, 1, d.HW, d.HW), _randn(g, d.B, d.T, d.DT),
                torch.randint(0, 1000, (d.B,), generator=g), torch.ones(d.B, d.T, dtype=torch.bool)), {}
    return cfg, inputs


def _allegro(d):
    if d.DH % 6:
        raise ValueError("AllegroTransformer3DModel has no hidden_eq_tokens config: its 3D rope splits the head dim "
                         "into three equal even parts, and no such head dim divides a hidden size of 16")
    cfg = dict(patch_size=d.P, patch_size_t=1, num_attention_heads=d.H, attention_head_dim=d.DH, in_channels=4,
               out_channels=4, num_layers=4, cross_attention_dim=d.D, sample_height=d.HW, sample_width=d.HW,
               sample_frames=1, caption_channels=d.DT)

    def inputs(g):
        # what AllegroPipeline._prepare_rotary_positional_embeddings passes: per-axis frequency tables
        # and per-token (t, h, w) position indices of shape (1, N)
        from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro
        side = d.HW // d.P
        ft, fh, fw, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
            embed_dim=d.DH, crops_coords=((0, 0), (side, side)), grid_size=(side, side), temporal_size=1,
            interpolation_scale=(2.2, 2.0, 2.0))
        pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
        rope = ((ft, fh, fw), tuple(pos.contiguous()))
        return (_randn(g, d.B, 4, 1, d.HW, d.HW), _randn(g, d.B, d.T, d.DT),
                torch.randint(0, 1000, (d.B,), generator=g)), dict(image_rotary_emb=rope)
    return cfg, inputs


def _hidream(d):
    cfg = dict(patch_size=d.P, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
               attention_head_dim=d.DH, num_attention_heads=d.H, caption_channels=[d.DT, d.DL], text_emb_dim=d.DP,
               num_routed_experts=2, num_activated_experts=2, axes_dims_rope=d.rope3(),
               max_resolution=(d.HW, d.HW), llama_layers=[0, 1, 1, 0])

    def inputs(g):
        return (_randn(g, d.B, 4, d.HW, d.HW),), dict(
            timesteps=torch.randint(0, 1000, (d.B,), generator=g), encoder_hidden_states_t5=_randn(g, d.B, d.T, d.DT),
            encoder_hidden_states_llama3=_randn(g, 2, d.B, d.T, d.DL), pooled_embeds=_randn(g, d.B, d.DP))
    return cfg, inputs


def _omnigen(d):
    side = d.HW // d.P
    cfg = dict(in_channels=4, patch_size=d.P, hidden_size=d.D, num_attention_heads=d.H, num_key_value_heads=d.H,
               intermediate_size=64, num_layers=4, pad_token_id=0, vocab_size=64, max_position_embeddings=256,
               original_max_position_embeddings=64, pos_embed_max_size=16, time_step_dim=d.DE,
               rope_scaling={"long_factor": [1.0] * (d.DH // 2), "short_factor": [1.0] * (d.DH // 2)})

    def inputs(g):
        L = d.T + 1 + d.N  # text tokens, the time token, the image tokens
        mask = torch.ones(d.B, L, L).tril()
        mask[:, -d.N:, -d.N:] = 1  # image tokens attend to each other (bidirectional), as the pipeline builds
        return (), dict(hidden_states=_randn(g, d.B, 4, d.HW, d.HW), timestep=torch.rand(d.B, generator=g),
                        input_ids=torch.randint(1, 64, (d.B, d.T), generator=g), input_img_latents=[],
                        input_image_sizes={}, attention_mask=mask,
                        position_ids=torch.arange(L).repeat(d.B, 1))
    return cfg, inputs


def _flux2(d):
    axes = (4, 4, 8, 8) if d.DH == 24 else (2, 2, 2, 2)
    cfg = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=d.DH,
               num_attention_heads=d.H, joint_attention_dim=d.DT, timestep_guidance_channels=32, mlp_ratio=2.0,
               axes_dims_rope=axes, guidance_embeds=False)

    def inputs(g):
        side = d.HW // d.P
        img_ids = torch.cat([torch.zeros(d.N, 1), _grid_ids(side, side)], dim=1)   # (t, h, w, l) = (0, row, col, 0)
        img_ids = img_ids[:, [0, 2, 3, 1]]
        txt_ids = torch.zeros(d.T, 4)
        txt_ids[:, 3] = torch.arange(d.T)
        return (), dict(hidden_states=_packed(g, d), encoder_hidden_states=_randn(g, d.B, d.T, d.DT),
                        timestep=torch.rand(d.B, generator=g), img_ids=img_ids, txt_ids=txt_ids)
    return cfg, inputs


def _zimage(d):
    # Z-Image takes LISTS of per-sample tensors: x = [(C, F, H, W)] * B, cap_feats = [(L, D)] * B
    cfg = dict(all_patch_size=(d.P,), all_f_patch_size=(1,), in_channels=4, dim=d.D, n_layers=4,
               n_refiner_layers=2, n_heads=d.H, n_kv_heads=d.H, cap_feat_dim=d.DT, axes_dims=list(d.rope3()),
               axes_lens=[64, 32, 32])

    def inputs(g):
        return ([_randn(g, 4, 1, d.HW, d.HW) for _ in range(d.B)], torch.rand(d.B, generator=g),
                [_randn(g, d.T, d.DT) for _ in range(d.B)]), {}
    return cfg, inputs


_REGISTRY = {
    "DiTTransformer2DModel": ("DiTTransformer2DModel", _dit),
    "PixArtTransformer2DModel": ("PixArtTransformer2DModel", _pixart),
    "SD3Transformer2DModel": ("SD3Transformer2DModel", _sd3),
    "SD3.5Transformer2DModel": ("SD3Transformer2DModel", lambda d: _sd3(d, dual=(0, 1))),
    "FluxTransformer2DModel": ("FluxTransformer2DModel", _flux),
    "HunyuanDiT2DModel": ("HunyuanDiT2DModel", _hunyuan_dit),
    "AuraFlowTransformer2DModel": ("AuraFlowTransformer2DModel", _auraflow),
    "CogView4Transformer2DModel": ("CogView4Transformer2DModel", _cogview4),
    "WanTransformer3DModel": ("WanTransformer3DModel", _wan),
    "LTXVideoTransformer3DModel": ("LTXVideoTransformer3DModel", _ltx),
    "QwenImageTransformer2DModel": ("QwenImageTransformer2DModel", _qwenimage),
    "Lumina2Transformer2DModel": ("Lumina2Transformer2DModel", _lumina2),
    "SanaTransformer2DModel": ("SanaTransformer2DModel", _sana),
    "CogVideoXTransformer3DModel": ("CogVideoXTransformer3DModel", _cogvideox),
    "CogVideoXTransformer3DModel/rope": ("CogVideoXTransformer3DModel", lambda d: _cogvideox(d, rope=True)),
    "HunyuanVideoTransformer3DModel": ("HunyuanVideoTransformer3DModel", _hunyuan_video),
    "MochiTransformer3DModel": ("MochiTransformer3DModel", _mochi),
    "AllegroTransformer3DModel": ("AllegroTransformer3DModel", _allegro),
    "ChromaTransformer2DModel": ("ChromaTransformer2DModel", _chroma),
    "HiDreamImageTransformer2DModel": ("HiDreamImageTransformer2DModel", _hidream),
    "OmniGenTransformer2DModel": ("OmniGenTransformer2DModel", _omnigen),
    "Flux2Transformer2DModel": ("Flux2Transformer2DModel", _flux2),
    "ZImageTransformer2DModel": ("ZImageTransformer2DModel", _zimage),
}
NAMES = list(_REGISTRY)
TEN = ["DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
       "HunyuanDiT2DModel", "AuraFlowTransformer2DModel", "CogView4Transformer2DModel", "WanTransformer3DModel",
       "LTXVideoTransformer3DModel", "QwenImageTransformer2DModel"]
# more classes the routing tests cover (AllegroTransformer3DModel has no "hidden_eq_tokens" config: `SKIP`)
MORE = ["SD3.5Transformer2DModel", "CogVideoXTransformer3DModel", "CogVideoXTransformer3DModel/rope",
        "MochiTransformer3DModel", "AllegroTransformer3DModel", "ChromaTransformer2DModel", "Flux2Transformer2DModel"]
SKIP = {("AllegroTransformer3DModel", "hidden_eq_tokens")}  # (name, case) pairs with no config

# block containers in call order (the chain a route indexes, read from each class's forward)
_TWO = ["transformer_blocks", "single_transformer_blocks"]
BLOCKS = {n: ["transformer_blocks"] for n in NAMES}
BLOCKS.update({"FluxTransformer2DModel": _TWO, "ChromaTransformer2DModel": _TWO, "Flux2Transformer2DModel": _TWO,
               "HunyuanVideoTransformer3DModel": _TWO, "HunyuanDiT2DModel": ["blocks"],
               "WanTransformer3DModel": ["blocks"],
               "AuraFlowTransformer2DModel": ["joint_transformer_blocks", "single_transformer_blocks"],
               "HiDreamImageTransformer2DModel": ["double_stream_blocks", "single_stream_blocks"],
               "Lumina2Transformer2DModel": ["layers"], "OmniGenTransformer2DModel": ["layers"],
               "ZImageTransformer2DModel": ["layers"]})


def block_names(model, name: str) -> list:
    """The qualified names of `name`'s main-chain blocks, in call order."""
    return [f"{c}.{i}" for c in BLOCKS[name] for i in range(len(model.get_submodule(c)))]


def sample(out):
    """The output tensor of a call: `.sample` of a BaseOutput, element 0 of a tuple; lists stacked."""
    y = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
    return torch.stack(y) if isinstance(y, list) else y


def inputs_only(name: str, case: str = "text8", seed: int = 0):
    """(args, kwargs) for `name` without building the model."""
    _, make = _REGISTRY[name]
    return make(dims(case))[1](_gen(seed))


def build(name: str, case: str = "text8", seed: int = 0):
    """(model, args, kwargs): a tiny random `name` model for `case` in train mode and one example call."""
    from diffusers.models import transformers as T_
    cls_name, make = _REGISTRY[name]
    cfg, inputs = make(dims(case))
    torch.manual_seed(seed)
    model = getattr(T_, cls_name)(**cfg)
    ZEROED[(name, case)] = _unzero(model, seed)
    _check_output_projections(model, name)
    model.train()
    args, kwargs = inputs(_gen(seed))
    return model, args, kwargs
