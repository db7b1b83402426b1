"""Training checkpoints: atomic writes, clear errors on bad files, and RNG state capture.

A checkpoint is a dict saved with `torch.save`: `model` (the plain backbone's state dict, so it
loads into the unrouted model), `ema`, `optimizer`, `step`, `rng`, `data` (loader position),
`routes` and `config` (how to rebuild the backbone and the run).

Example:
    >>> save_checkpoint("/tmp/ck.pt", {"step": 1})    # doctest: +SKIP
    >>> load_checkpoint("/tmp/ck.pt")["step"]          # doctest: +SKIP
    1
"""
import os
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

__all__ = ["CheckpointError", "FORMAT", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "load_weights", "stale_temp_files", "remove_stale_temps"]

FORMAT = "routefx-train/1"
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
    """Read a checkpoint written by `save_checkpoint`; `CheckpointError` naming the file if not."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train first, or pass the right file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}). It is "
                              f"corrupt or not a torch file; it was left untouched. Delete it or "
                              f"resume from another checkpoint.") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a routefx training checkpoint (format {got!r}, "
                              f"expected {FORMAT!r}); it was left untouched.")
    return state


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
    """Every random state a training step reads: torch (CPU and CUDA), numpy, Python, routing."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "routing": generator.get_state() if generator is not None else None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator = None) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if generator is not None and state.get("routing") is not None:
        generator.set_state(state["routing"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
