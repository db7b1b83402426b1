"""Training checkpoints: atomic writes, clear errors on bad files, and RNG state capture.

A checkpoint is a dict saved with `torch.save`: `model` (the plain backbone's state dict, so it
loads into the unrouted model), `ema`, `optimizer`, `step`, `rng`, `data` (loader position),
`routes` and `config` (how to rebuild the backbone and the run). Everything in it is a tensor,
number, string or plain container, and it is read back with `torch.load(weights_only=True)`:
loading a checkpoint never runs code from it, whoever made the file. `save_checkpoint` refuses
a state that would not load that way. Checkpoints of routefx 0.1 (`routefx-train/1`) held numpy's
RNG state as an array; `python -m routefx.checkpoint upgrade OLD NEW --trust-checkpoint` rewrites
one you trust.

Example:
    >>> save_checkpoint("/tmp/ck.pt", {"step": 1})    # doctest: +SKIP
    >>> load_checkpoint("/tmp/ck.pt")["step"]          # doctest: +SKIP
    1
"""
import argparse
import os
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

__all__ = ["CheckpointError", "FORMAT", "save_checkpoint", "load_checkpoint", "upgrade_checkpoint",
           "unsafe_globals", "rng_state", "set_rng_state", "load_weights", "stale_temp_files",
           "remove_stale_temps", "main"]

FORMAT = "routefx-train/2"
LEGACY_FORMAT = "routefx-train/1"  # routefx 0.1: numpy's RNG state as an ndarray (needs full unpickling)
LEGACY_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                  "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".pt"  # save_checkpoint's temp files: `.tmp-<random>.pt`


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run; the file is left untouched."""


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, `os.replace`,
    fsync of the folder.

    An error while writing leaves any previous file at `path` intact and removes the temp file;
    a process killed while writing (SIGKILL) leaves `path` intact and a `.tmp-*.pt` file, which
    `remove_stale_temps` deletes (the trainer calls it on `--resume`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        unsafe = unsafe_globals(tmp)
        if unsafe:  # would be refused by load_checkpoint: fail now, keep the previous file
            raise CheckpointError(f"refusing to write {path}: the state holds objects that are not "
                                  f"weights ({', '.join(unsafe)}); store tensors, numbers, strings, "
                                  f"lists and dicts only.")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Flush the folder entry, so the rename itself survives a power cut (POSIX; a no-op where a
    folder cannot be opened, e.g. Windows). A SIGKILL does not need it: the kernel has the rename."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(folder: str) -> list:
    """The `save_checkpoint` temp files in `folder` (sorted paths): left by a write that never
    finished (SIGKILL, OOM kill, power loss), or being written right now by a live process."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.startswith(TEMP_PREFIX) and n.endswith(TEMP_SUFFIX)
                  and os.path.isfile(os.path.join(folder, n)))


def remove_stale_temps(folder: str) -> list:
    """Delete the temp files of interrupted `save_checkpoint` calls in `folder`; returns their paths.

    Only the process that owns `folder` may call this, before it writes there (the trainer does it
    on `--resume`): a temp file of a save in progress in another process would be deleted too.
    """
    removed = []
    for path in stale_temp_files(folder):
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:  # gone meanwhile
            pass
    return removed


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; `CheckpointError` naming the file if not.

    The file is read with `torch.load(weights_only=True)`: tensors, numbers, strings and plain
    containers only, so a crafted file cannot run code. Anything else is refused unread.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train first, or pass the right file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(_unsafe_message(path, e)) from None
        raise CheckpointError(_corrupt_message(path, e)) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(_corrupt_message(path, e)) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a routefx training checkpoint (format {got!r}, "
                              f"expected {FORMAT!r}); it was left untouched.")
    return state


def _corrupt_message(path, e) -> str:
    return (f"cannot read checkpoint {path} ({type(e).__name__}: {e}). It is corrupt or not a "
            f"torch file; it was left untouched. Delete it or resume from another checkpoint.")


def _unsafe_message(path, e) -> str:
    """Why a file failed the weights-only loader, and what to do (nothing in it was run)."""
    found = unsafe_globals(path)
    head = (f"refused to load {path}: it holds pickled Python objects, not only weights "
            f"({', '.join(found) if found else 'pickle instructions the weights-only loader rejects'}). "
            f"routefx reads checkpoints with torch.load(weights_only=True), so nothing in the file ran.")
    if found and set(found) <= LEGACY_GLOBALS:
        return (f"{head} It looks like a checkpoint of an older routefx (format {LEGACY_FORMAT!r}, numpy "
                f"RNG state as an array). If you trust where it came from, convert it once:\n"
                f"  python -m routefx.checkpoint upgrade {path} NEW.pt --trust-checkpoint")
    return f"{head} It is not a routefx checkpoint: do not load it with pickle or weights_only=False."


def unsafe_globals(path: str) -> list:
    """The Python globals a torch file's pickle would import (empty: weights only; [] also for a
    file this cannot read, such as a plain pickle, whose instructions the loader refuses anyway)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip file: torch.load refuses its pickle as a whole
        return []


def upgrade_checkpoint(src: str, dst: str) -> None:
    """Rewrite a trusted checkpoint of an older routefx (format `routefx-train/1`) as `FORMAT`.

    This is the one place that unpickles without `weights_only`: it runs whatever `src` holds, so
    call it only on a file you made or trust (the CLI asks for `--trust-checkpoint`).
    """
    state = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") not in (LEGACY_FORMAT, FORMAT):
        raise CheckpointError(f"{src} is not a routefx training checkpoint; nothing to upgrade.")
    state["rng"] = [_encode_rng(r) for r in state.get("rng") or []]
    state.pop("format")
    save_checkpoint(dst, state)
    load_checkpoint(dst)


def load_weights(model: torch.nn.Module, weights: dict, path: str, what: str = "model") -> None:
    """`model.load_state_dict(weights, strict=True)`, with an error that names the file."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the {what} weights in {path} do not fit this model: {e}\nThe "
                              f"checkpoint was made with another backbone or size; use the same "
                              f"--backbone / --image-size / --data as that run, or another --out. "
                              f"The file was left untouched.") from e


def rng_state(generator: torch.Generator = None) -> dict:
    """Every random state a training step reads: torch (CPU and CUDA), numpy, Python, routing;
    as tensors, numbers and dicts only (weights-only loadable)."""
    state = _encode_rng({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                         "python": random.getstate(),
                         "routing": generator.get_state() if generator is not None else None})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator = None) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if generator is not None and state.get("routing") is not None:
        generator.set_state(state["routing"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode_rng(state: dict) -> dict:
    """numpy's and Python's state tuples (an ndarray inside) as dicts of tensors and numbers;
    a state already encoded is returned as it is."""
    out = dict(state)
    if isinstance(state["numpy"], tuple):
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        if kind != "MT19937":
            raise CheckpointError(f"numpy's global generator is {kind!r}; routefx saves MT19937 only")
        out["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    if isinstance(state["python"], tuple):
        version, internal, gauss_next = state["python"]
        out["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                         "gauss_next": gauss_next}
    return out


def main(argv=None) -> int:
    """`python -m routefx.checkpoint upgrade OLD NEW --trust-checkpoint`: convert an older checkpoint."""
    p = argparse.ArgumentParser(prog="python -m routefx.checkpoint", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help=f"rewrite a {LEGACY_FORMAT} checkpoint as {FORMAT}")
    up.add_argument("src")
    up.add_argument("dst")
    up.add_argument("--trust-checkpoint", action="store_true",
                    help="required: reading the old file unpickles it, which runs any code it holds")
    a = p.parse_args(argv)
    if not a.trust_checkpoint:
        raise CheckpointError(f"upgrading {a.src} unpickles it without weights_only, which runs any "
                              f"code the file holds. Pass --trust-checkpoint only for a file you made "
                              f"or trust.")
    upgrade_checkpoint(a.src, a.dst)
    print(f"[routefx.checkpoint] wrote {a.dst} ({FORMAT}); it loads with weights_only=True.", flush=True)
    return 0


if __name__ == "__main__":
    from .train import run_cli
    run_cli("routefx.checkpoint", main, (CheckpointError,))
