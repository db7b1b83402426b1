"""Hand-written TREAD (TREAD.md section 1) for ten stock diffusers transformers, done with hooks on the
ORIGINAL, unrouted model: no tracing, no routefx code.

    with tread_hooks(model, name, chain, start, end, ids) as ref:
        out = model(*args, **kwargs)
    ref.selection   # what the TREAD selector draws at the route start from the same RNG state

For a route `start..end` (inclusive) over `chain` (qualified block names) and kept indices `ids`
(batch, n_keep) into the N image tokens:

* a forward pre-hook on block `start` saves the image-token stream and replaces it with its kept
  tokens (`gather` along the token dim); the pre-hooks of every block `start..end` also gather each
  per-token side input the block receives (rotary tables, long skips produced before the route) with
  the same ids; the text stream is never touched;
* a forward hook on block `end` scatters the processed kept image tokens back into the saved stream
  (out of place); text outputs pass unchanged;
* a long skip produced inside the route and consumed after it is scattered into the saved stream.

At the route start the hook also draws what the TREAD selector draws there (`torch.rand(rows, N)`,
argsort, first n_keep, sorted): it keeps the global RNG in step with a routed forward (DiT drops class
labels at random in every block in train mode) and gives the selection to compare with routefx's.

What each block takes and returns, read from diffusers 0.42.1 (models/transformers/*.py):

| class | image in | text in | block returns | per-token side inputs |
|---|---|---|---|---|
| DiT (BasicTransformerBlock) | hidden_states | - (class labels, timestep: per sample) | h | - |
| PixArt (BasicTransformerBlock) | hidden_states | encoder_hidden_states (cross-attn) | h | - |
| SD3 (JointTransformerBlock) | hidden_states | encoder_hidden_states (joint attn, image first) | (enc, h); last: (None, h) | - |
| Flux (FluxTransformerBlock, FluxSingleTransformerBlock) | hidden_states | encoder_hidden_states (joint, text first; the single block cats [text, image] inside and splits back) | (enc, h) | image_rotary_emb (cos, sin), unbatched (T + N, d), text rows first |
| HunyuanDiT (HunyuanDiTBlock) | hidden_states | encoder_hidden_states (cross-attn, 2 encoders cat) | h | image_rotary_emb (cos, sin) unbatched (N, d); skip (B, N, D) in blocks > L//2 |
| AuraFlow joint | hidden_states | encoder_hidden_states ([8 registers, text]) | (enc, h) | - |
| AuraFlow single | hidden_states = cat([registers, text, image]) built by the root forward | the first 8 + T tokens of it | the combined tensor | - |
| CogView4 (CogView4TransformerBlock) | hidden_states (arg 0) | encoder_hidden_states (arg 1; joint, text first) | (h, enc) | image_rotary_emb (cos, sin) unbatched (N, d), applied to the image part only |
| Wan (WanTransformerBlock) | hidden_states (arg 0) | encoder_hidden_states (arg 1, cross-attn) | h | rotary_emb (cos, sin) (1, N, 1, d): broadcast over the batch |
| LTX (LTXVideoTransformerBlock) | hidden_states | encoder_hidden_states (cross-attn; its mask is per text token) | h | image_rotary_emb (cos, sin) (B, N, D) |
| QwenImage (QwenImageTransformerBlock) | hidden_states | encoder_hidden_states (joint, text first; mask per text token) | (enc, h) | image_rotary_emb = (img_freqs (N, d/2) complex, txt_freqs (T, d/2)): unbatched, separate per stream |
| SD3.5 (JointTransformerBlock, use_dual_attention) | hidden_states (also attn2: self-attn on the image only) | encoder_hidden_states (joint, image first) | (enc, h); last: (None, h) | - |
| CogVideoX (CogVideoXBlock) | hidden_states | encoder_hidden_states (joint, text first; ff on cat [text, image]) | (h, enc) | - (2b: learned positions added by patch_embed) |
| CogVideoX/rope | as CogVideoX | as CogVideoX | (h, enc) | image_rotary_emb (cos, sin) unbatched (N, d), applied to q/k[:, :, T:] only |
| Mochi (MochiTransformerBlock) | hidden_states | encoder_hidden_states (joint, image first, per-sample valid text; last block context_pre_only) | (h, enc) | image_rotary_emb (cos, sin) unbatched (N, H, d/2), image q/k only |
| Allegro (AllegroTransformerBlock) | hidden_states | encoder_hidden_states (cross-attn) | h | image_rotary_emb = ((t, h, w) (cos, sin) per-axis frequency tables: NOT per token), (pos_t, pos_h, pos_w) each (1, N): per-token position ids, broadcast over the batch |
| Chroma (ChromaTransformerBlock) | hidden_states | encoder_hidden_states (joint, text first) | (enc, h) | image_rotary_emb (cos, sin) unbatched (T + N, d), text rows first |
| Chroma single (ChromaSingleTransformerBlock) | hidden_states = cat([text, image]) built by the root forward | its first T tokens | the combined tensor | image_rotary_emb as above |
| Flux2 (Flux2TransformerBlock) | hidden_states | encoder_hidden_states (joint, text first) | (enc, h) | image_rotary_emb = concat (cos, sin) unbatched (T + N, d), text rows first |
| Flux2 single (Flux2SingleTransformerBlock, encoder_hidden_states=None) | hidden_states = cat([text, image]) built by the root forward | its first T tokens | the combined tensor | image_rotary_emb as above |

An unbatched table can follow one selection only: those models route with ONE index set for the
batch (`shared`, ids rows identical; the table is gathered with ids[0]). A (1, N, ...) table that
the block broadcasts over the batch (Wan) and a batched (B, N, ...) table (LTX) are gathered per sample.
"""
import contextlib
import dataclasses
import inspect

import torch

from helpers import gather, scatter  # noqa: F401 - part of this module's interface

__all__ = ["FAMILIES", "Family", "tread_hooks", "text_len", "image_of", "text_of", "gather", "scatter",
           "selection"]


# ------------------------------------------------------------------------------ tensor helpers

def selection(batch, n, ratio, shared):
    """TREAD's selector (README "Route semantics"): rand -> argsort -> first n_keep -> sorted."""
    n_keep = n - int(n * ratio)
    ids = torch.rand(1 if shared else batch, n).argsort(dim=1)[:, :n_keep].sort(dim=1).values
    return ids.expand(batch, -1)


def _rows(table, ids):
    """An unbatched (N, ...) table indexed with ONE selection (ids rows must be equal)."""
    assert (ids == ids[:1]).all(), "an unbatched table needs one index set for the batch"
    return table[ids[0]]


# ------------------------------------------------------------------------------ families

@dataclasses.dataclass
class Family:
    """How one block type takes and returns its streams. `joined`: the block gets ONE tensor
    [text (text_len tokens), image] (AuraFlow single blocks); otherwise `hidden_states` is the image
    stream and `encoder_hidden_states` the text stream (or None)."""

    out_image: int | None = None   # index of the image tensor in the returned tuple; None: returns h
    table: str | None = None       # parameter name of the per-token table
    table_kind: str | None = None  # "image_rows" | "text_then_image" | "per_sample" | "first_image_rows"
    #                                | "allegro_positions"
    joined: bool = False
    has_text: bool = True
    skip: bool = False             # takes a long skip `skip` (B, N, D) (HunyuanDiT)

    @property
    def shared(self) -> bool:
        return self.table_kind in ("image_rows", "text_then_image", "first_image_rows")


_SEP = Family(out_image=None)
FAMILIES = {
    "DiTTransformer2DModel": {"transformer_blocks": Family(has_text=False)},
    "PixArtTransformer2DModel": {"transformer_blocks": _SEP},
    "SD3Transformer2DModel": {"transformer_blocks": Family(out_image=1)},
    "FluxTransformer2DModel": {
        "transformer_blocks": Family(out_image=1, table="image_rotary_emb", table_kind="text_then_image"),
        "single_transformer_blocks": Family(out_image=1, table="image_rotary_emb", table_kind="text_then_image")},
    "HunyuanDiT2DModel": {"blocks": Family(table="image_rotary_emb", table_kind="image_rows", skip=True)},
    "AuraFlowTransformer2DModel": {"joint_transformer_blocks": Family(out_image=1),
                                   "single_transformer_blocks": Family(joined=True)},
    "CogView4Transformer2DModel": {"transformer_blocks": Family(out_image=0, table="image_rotary_emb",
                                                                table_kind="image_rows")},
    "WanTransformer3DModel": {"blocks": Family(table="rotary_emb", table_kind="per_sample")},
    "LTXVideoTransformer3DModel": {"transformer_blocks": Family(table="image_rotary_emb", table_kind="per_sample")},
    "QwenImageTransformer2DModel": {"transformer_blocks": Family(out_image=1, table="image_rotary_emb",
                                                                 table_kind="first_image_rows")},
    "SD3.5Transformer2DModel": {"transformer_blocks": Family(out_image=1)},
    "CogVideoXTransformer3DModel": {"transformer_blocks": Family(out_image=0)},
    "CogVideoXTransformer3DModel/rope": {"transformer_blocks": Family(out_image=0, table="image_rotary_emb",
                                                                      table_kind="image_rows")},
    "MochiTransformer3DModel": {"transformer_blocks": Family(out_image=0, table="image_rotary_emb",
                                                             table_kind="image_rows")},
    "AllegroTransformer3DModel": {"transformer_blocks": Family(table="image_rotary_emb",
                                                               table_kind="allegro_positions")},
    "ChromaTransformer2DModel": {
        "transformer_blocks": Family(out_image=1, table="image_rotary_emb", table_kind="text_then_image"),
        "single_transformer_blocks": Family(joined=True, table="image_rotary_emb", table_kind="text_then_image")},
    "Flux2Transformer2DModel": {
        "transformer_blocks": Family(out_image=1, table="image_rotary_emb", table_kind="text_then_image"),
        "single_transformer_blocks": Family(joined=True, table="image_rotary_emb", table_kind="text_then_image")},
}


def family(name, block):
    return FAMILIES[name][block.rpartition(".")[0]]


def shared(name) -> bool:
    """Whether the class's blocks take an unbatched per-token table (then: one index set per batch)."""
    return any(f.shared for f in FAMILIES[name].values())


def text_len(model, name, args, kwargs) -> int:
    """Text tokens the blocks see, from the model code: AuraFlow prepends its register tokens,
    HunyuanDiT concatenates its two encoders, CogView4 / Wan take the text positionally."""
    if name == "DiTTransformer2DModel":
        return 0
    if name == "AuraFlowTransformer2DModel":
        return model.register_tokens.shape[1] + kwargs["encoder_hidden_states"].shape[1]
    if name == "HunyuanDiT2DModel":
        return kwargs["encoder_hidden_states"].shape[1] + kwargs["encoder_hidden_states_t5"].shape[1]
    if name == "CogView4Transformer2DModel":
        return args[1].shape[1]
    if name == "WanTransformer3DModel":
        return args[2].shape[1]
    if name in ("CogVideoXTransformer3DModel", "CogVideoXTransformer3DModel/rope", "MochiTransformer3DModel",
                "AllegroTransformer3DModel"):
        return args[1].shape[1]
    return kwargs["encoder_hidden_states"].shape[1]


def _bind(module, args, kwargs):
    b = inspect.signature(module.forward).bind(*args, **kwargs)
    return b


def image_of(fam, arguments, t_len):
    h = arguments["hidden_states"]
    return h[:, t_len:] if fam.joined else h


def text_of(fam, arguments, t_len):
    if fam.joined:
        return arguments["hidden_states"][:, :t_len]
    return arguments.get("encoder_hidden_states") if fam.has_text else None


def _set_image(fam, arguments, new, t_len):
    if fam.joined:
        arguments["hidden_states"] = torch.cat([arguments["hidden_states"][:, :t_len], new], dim=1)
    else:
        arguments["hidden_states"] = new


def _gather_table(fam, arguments, ids, t_len):
    if fam.table is None or arguments.get(fam.table) is None:
        return
    tab = arguments[fam.table]
    if fam.table_kind == "image_rows":            # (cos, sin), each (N, d)
        new = tuple(_rows(t, ids) for t in tab)
    elif fam.table_kind == "first_image_rows":    # (img (N, d/2), txt (T, d/2)): only the image table
        new = (_rows(tab[0], ids), tab[1])
    elif fam.table_kind == "text_then_image":     # (cos, sin), each (T + N, d), text rows first
        t = t_len if fam.joined else arguments["encoder_hidden_states"].shape[1]
        new = tuple(torch.cat([x[:t], _rows(x[t:], ids)], dim=0) for x in tab)
    elif fam.table_kind == "per_sample":          # (cos, sin), each (B or 1, N, ...)
        new = tuple(gather(x, ids) for x in tab)
    elif fam.table_kind == "allegro_positions":   # (per-axis freqs: untouched, (pos_t, pos_h, pos_w) each (1, N))
        freqs, pos = tab
        new = (freqs, tuple(gather(p, ids) for p in pos))
    else:
        raise AssertionError(fam.table_kind)
    arguments[fam.table] = type(tab)(new) if isinstance(tab, (tuple, list)) else new


def _out_image(fam, out, t_len):
    if fam.joined:
        return out[:, t_len:]
    return out if fam.out_image is None else out[fam.out_image]


def _out_set_image(fam, out, new, t_len):
    if fam.joined:
        return torch.cat([out[:, :t_len], new], dim=1)
    if fam.out_image is None:
        return new
    out = list(out)
    out[fam.out_image] = new
    return tuple(out)


@dataclasses.dataclass
class Reference:
    selection: torch.Tensor | None = None   # what TREAD's selector drew at the route start
    saved: torch.Tensor | None = None       # the image stream entering block `start`
    seen: dict = dataclasses.field(default_factory=dict)  # block -> (image tokens, text tensor or None)


@contextlib.contextmanager
def tread_hooks(model, name, chain, start, end, ids, ratio, t_len, record=True, draw=True):
    """Hooks that turn `model`'s next forwards into TREAD over chain[start..end] with kept `ids`.
    `draw=False`: do not draw the selector's random numbers at the route start (to compare with a
    dense forward, which draws none)."""
    ref = Reference()
    batch, n_keep = ids.shape
    handles = []

    def pre(i, block):
        fam = family(name, block)

        def hook(module, args, kwargs):
            b = _bind(module, args, kwargs)
            a = b.arguments
            if i == start:
                full = image_of(fam, a, t_len)
                if draw:
                    ref.selection = selection(batch, full.shape[1], ratio, shared(name))
                ref.saved = full
                _set_image(fam, a, gather(full, ids), t_len)
            if start <= i <= end:
                _gather_table(fam, a, ids, t_len)
                if fam.skip and a.get("skip") is not None and a["skip"].shape[1] != n_keep:
                    a["skip"] = gather(a["skip"], ids)          # produced before the route
            elif i > end and fam.skip and a.get("skip") is not None and a["skip"].shape[1] == n_keep:
                a["skip"] = scatter(ref.saved, ids, a["skip"])  # produced inside the route
            if record:
                txt = text_of(fam, a, t_len)
                ref.seen[block] = (image_of(fam, a, t_len).shape[1], None if txt is None else txt.detach().clone())
            return b.args, b.kwargs
        return hook

    def post(block):
        fam = family(name, block)

        def hook(module, args, out):
            return _out_set_image(fam, out, scatter(ref.saved, ids, _out_image(fam, out, t_len)), t_len)
        return hook

    try:
        for i, block in enumerate(chain):
            handles.append(model.get_submodule(block).register_forward_pre_hook(pre(i, block), with_kwargs=True))
        handles.append(model.get_submodule(chain[end]).register_forward_hook(post(chain[end])))
        yield ref
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def recorder(model, name, chain, t_len):
    """Pre-hooks that only record, per chain block, (image tokens seen, text tensor or None)."""
    seen = {}
    handles = []

    def pre(block):
        fam = family(name, block)

        def hook(module, args, kwargs):
            a = _bind(module, args, kwargs).arguments
            txt = text_of(fam, a, t_len)
            seen[block] = (image_of(fam, a, t_len).shape[1], None if txt is None else txt.detach().clone())
        return hook

    try:
        for block in chain:
            handles.append(model.get_submodule(block).register_forward_pre_hook(pre(block), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()
