"""A tiny random FluxTransformer2DModel (diffusers, no weights, no download) for routefx.inspect.

    python -m routefx.inspect docs/examples/flux_tiny.py --route 1,2,0.5

Flux runs 2 kinds of blocks (dual-stream, then single-stream); routefx finds them as one chain of
4 and routes the image tokens only (text tokens are never routed). The sizes are tiny; a real Flux
has 19 + 38 blocks and the same structure.
"""
import torch
from diffusers import FluxTransformer2DModel

SIDE, TEXT = 8, 8  # 8x8 packed latent = 64 image tokens, 8 text tokens


def build_model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def example_inputs():
    ids = torch.zeros(SIDE, SIDE, 3)
    ids[..., 1], ids[..., 2] = torch.arange(SIDE)[:, None], torch.arange(SIDE)[None, :]
    return dict(hidden_states=torch.randn(2, SIDE * SIDE, 16), encoder_hidden_states=torch.randn(2, TEXT, 32),
                pooled_projections=torch.randn(2, 24), timestep=torch.rand(2), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(TEXT, 3), return_dict=False)
