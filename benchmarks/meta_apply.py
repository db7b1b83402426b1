"""`routefx.apply` on full-size models built on the meta device (no real weights): seconds and
memory. Prints one line per model; run `python benchmarks/meta_apply.py`.

DiT-XL/2 (675M parameters, 256 tokens) and diffusers' FluxTransformer2DModel at its default
(full) config (11.9B parameters, 1024 image + 128 text tokens). The capture runs on fake
tensors; the check on real values is skipped for meta tensors (it says so)."""
import resource
import time

import torch

import routefx


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(name, build, inputs, route):
    with torch.device("meta"):
        model = build()
        args, kwargs = inputs()
    before = _rss_mb()
    t0 = time.perf_counter()
    routefx.apply(model, [route], example_inputs=(args, kwargs))
    seconds = time.perf_counter() - t0
    rg = routefx.router(model)._graphs[0][1]
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e9:.2f}B parameters, {len(rg.chain)} blocks, apply {seconds:.1f} s, "
          f"peak RSS {before:.0f} -> {_rss_mb():.0f} MB (weights would be {params * 4 / 2**20:.0f} MB), "
          f"check: {rg.check}")


def main():
    from routefx.backbones import create
    _run("DiT-XL/2", lambda: create("DiT-XL/2"),
         lambda: ((torch.randn(4, 4, 32, 32), torch.rand(4) * 999, torch.randint(0, 1000, (4,))), {}), (2, 23, 0.5))
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        print("Flux: diffusers is not installed")
        return
    n_img, n_txt = 1024, 128
    _run("FluxTransformer2DModel", lambda: FluxTransformer2DModel(guidance_embeds=True),
         lambda: ((), dict(hidden_states=torch.randn(1, n_img, 64), encoder_hidden_states=torch.randn(1, n_txt, 4096),
                           pooled_projections=torch.randn(1, 768), timestep=torch.rand(1),
                           img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), guidance=torch.ones(1),
                           return_dict=False)), (2, -4, 0.5))


if __name__ == "__main__":
    main()
