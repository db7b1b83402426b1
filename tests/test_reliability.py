"""Hardening (issue 7): data-dependent control flow at capture, ratio schedules under
torch.compile (recompiles counted), and a training process killed with SIGKILL in the middle of a
checkpoint write, then resumed. docs/reliability.md lists every guarantee and its test.
"""
import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import routefx
from routefx import CaptureError
from routefx.checkpoint import TEMP_PREFIX, CheckpointError, load_checkpoint, remove_stale_temps, save_checkpoint, stale_temp_files
from routefx.train import main
from routefx.viz import read_metrics
from helpers import dit_inputs, tiny_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


# ================================================================ 1. data-dependent control flow

class Block(nn.Module):
    def __init__(self, d=8, branch=False):
        super().__init__()
        self.fc, self.branch = nn.Linear(d, d), branch

    def forward(self, x):
        if self.branch and x.mean() > 0:  # inside a leaf block: never traced
            return x - self.fc(x)
        return x + self.fc(x)


class Clamp(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        if x.abs().max() > 100:  # data-dependent, inside a submodule fx inlines
            x = x / 100
        return self.fc(x)


class Branchy(nn.Module):
    """Blocks 0..4 with one piece of data-dependent Python after block 1, picked by `kind`."""

    def __init__(self, kind="none", branch_in_blocks=False):
        super().__init__()
        self.kind = kind
        self.embed, self.clamp = nn.Linear(4, 8), Clamp()
        self.blocks = nn.ModuleList(Block(branch=branch_in_blocks) for _ in range(5))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        h = self.embed(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == 1:
                h = self.between(h)
        return h

    def between(self, h):
        k = self.kind
        if k == "if":
            if h.sum() > 0:
                h = h * 2
        elif k == "while":
            while h.norm() > 1e6:
                h = h / 2
        elif k == "range":
            for _ in range(int(h.abs().max() * 0)):
                h = h + 1
        elif k == "bool":
            h = h if bool((h > 0).any()) else -h
        elif k == "float":
            h = h * float(h.std())
        elif k == "item":
            h = h * (2 if h.mean().item() > 0 else 1)
        elif k == "submodule":
            h = self.clamp(h)
        elif k == "buffer_item":  # not data-dependent: a buffer's value, not the inputs'
            h = h * self.scale.item()
        return h


# (an `assert` on values is not refused: it is kept as a run-time check, test_capture_python.py)
DATA_DEPENDENT = {  # kind: the source text the error must quote
    "if": "if h.sum() > 0:", "while": "while h.norm() > 1e6:", "range": "for _ in range(int(h.abs().max() * 0)):",
    "bool": "bool((h > 0).any())", "float": "float(h.std())",
    "item": "h.mean().item()", "submodule": "if x.abs().max() > 100:",
}


# branchy blocks: a data-dependent branch inside the leaf blocks makes capture fall back to real
# values, and the refusals must not depend on it (real values would turn `.item()` into a guard)
@pytest.mark.parametrize("leaf_branch", [False, True], ids=["plain-blocks", "branchy-blocks"])
@pytest.mark.parametrize("kind", list(DATA_DEPENDENT))
def test_data_dependent_control_flow_in_traced_code_is_refused_with_file_line_and_fix(kind, leaf_branch):
    model = Branchy(kind, branch_in_blocks=leaf_branch)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CaptureError) as e:
        routefx.apply(model, [(0, 3, 0.5)], example_inputs=(torch.randn(2, 10, 4),))
    msg = str(e.value)
    assert "test_reliability.py:" in msg and DATA_DEPENDENT[kind] in msg, msg
    assert "leaf_modules" in msg, "the message names the fix"
    if kind == "submodule":
        assert "clamp" in msg or "Clamp" in msg or "its.name" in msg
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_shape_dependent_python_is_fine():
    """The same model without data-dependent code routes (control: the refusals above are specific)."""
    routed = routefx.apply(Branchy("none"), [(0, 3, 0.5)], example_inputs=(torch.randn(2, 10, 4),))
    assert routed(torch.randn(3, 10, 4)).shape == (3, 10, 8)


def _tread_reference(model, x, route):
    s, e, ratio = route
    h = model.embed(x)
    for i, block in enumerate(model.blocks):
        if i == s:
            saved = h
            ids = torch.rand(h.shape[0], h.shape[1]).argsort(1)[:, :h.shape[1] - int(h.shape[1] * ratio)]
            ids = ids.sort(1).values[..., None].expand(-1, -1, h.shape[-1])
            h = h.gather(1, ids)
        h = block(h)
        if i == 1:
            h = model.between(h)
        if i == e:
            h = saved.scatter(1, ids, h)
    return h


def test_data_dependent_branch_inside_a_leaf_block_is_accepted():
    """Leaves run live: each call takes its own branches, not the ones seen at capture."""
    torch.manual_seed(0)
    model = Branchy("none", branch_in_blocks=True)
    x = torch.randn(3, 10, 4)
    routed = routefx.apply(model, [(0, 3, 0.5)], example_inputs=(x,))
    taken = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: taken.append(bool(i[0].mean() > 0)))
    patterns = set()
    for inp in (x, -x):
        taken.clear()
        torch.manual_seed(1)
        out = routed(inp)
        patterns.add(tuple(taken))
        torch.manual_seed(1)
        assert torch.allclose(out, _tread_reference(model, inp, (0, 3, 0.5)), atol=1e-6)
    assert len(patterns) == 2 and {True, False} <= {b for p in patterns for b in p}, patterns


def test_the_leaf_modules_fix_named_by_the_error_works():
    torch.manual_seed(0)
    model = Branchy("submodule")
    x = torch.randn(3, 10, 4)
    routed = routefx.apply(model, [(0, 3, 0.5)], leaf_modules=["clamp"], example_inputs=(x,))
    torch.manual_seed(1)
    out = routed(x)
    torch.manual_seed(1)
    assert torch.allclose(out, _tread_reference(model, x, (0, 3, 0.5)), atol=1e-6)


@pytest.mark.parametrize("leaf_branch", [False, True], ids=["plain-blocks", "branchy-blocks"])
def test_item_of_a_buffer_is_accepted_with_fake_and_real_values(leaf_branch):
    """Control for the `.item()` refusal: it is about the inputs' values, also with real values."""
    torch.manual_seed(0)
    model = Branchy("buffer_item", branch_in_blocks=leaf_branch)
    x = torch.randn(3, 10, 4)
    routed = routefx.apply(model, [(0, 3, 0.5)], example_inputs=(x,))
    torch.manual_seed(1)
    out = routed(x)
    torch.manual_seed(1)
    assert torch.allclose(out, _tread_reference(model, x, (0, 3, 0.5)), atol=1e-6)


# ================================================================ 2. ratio schedules under compile

SCHEDULE = [0.5, 0.25, 0.5, 0.25, 0.0, 0.5, 0.0]  # 3 distinct ratios, each seen again later


def _run_schedule(how, schedule):
    """Train steps of a compiled routed tiny DiT through `schedule`; checks every output against
    eager at the same RNG state; returns dynamo's unique graph count after each step.

    aot_eager = dynamo + AOT autograd (what inductor is fed): the guards and recompiles are
    inductor's, without minutes of C++ codegen on one core.
    """
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_dit(depth=3)
    opts = {"backend": "aot_eager"}
    routed = routefx.apply(model, [(1, 1, 0.5)], compile=opts if how == "inner" else None)
    fn = torch.compile(routed, **opts) if how == "outer" else routed
    eager = routefx.apply(copy.deepcopy(model), [(1, 1, 0.5)])  # (apply routes in place)
    graphs = []
    for step, ratio in enumerate(schedule):
        routefx.router(routed).set_ratio(ratio)
        routefx.router(eager).set_ratio(ratio)
        torch.manual_seed(step)
        out = fn(*dit_inputs(3, seed=step))
        out.square().mean().backward()
        torch.manual_seed(step)
        ref = eager(*dit_inputs(3, seed=step))
        assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5), (how, ratio)
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return graphs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["inner", "outer"])
def test_ratio_schedule_compiles_once_per_distinct_ratio_never_on_repeat(how):
    """`set_ratio` between steps: dynamo guards on the ratio, so each new ratio is one recompile
    (ratio 0 is its own graph: nothing is gathered); a ratio seen before reuses its graph."""
    graphs = _run_schedule(how, SCHEDULE)
    assert graphs == [1, 2, 2, 2, 3, 3, 3], graphs


@pytest.mark.slow
def test_schedule_past_the_recompile_limit_falls_back_to_eager_and_stays_correct():
    """More distinct ratios than `torch._dynamo.config.recompile_limit` (8 by default; 1 here to
    keep it cheap): dynamo compiles no new graph and runs the new ratios eagerly, with the same
    numbers (checked in `_run_schedule`) and a warning "hit config.recompile_limit"."""
    with torch._dynamo.config.patch(recompile_limit=1):
        graphs = _run_schedule("inner", [0.5, 0.25, 0.75, 0.5])
    assert graphs == [1, 1, 1, 1], graphs


# ================================================================ 3. SIGKILL during a checkpoint write

# width 128 -> 1.3M parameters, a ~20 MB checkpoint (model + EMA + AdamW): torch.save + fsync take
# tens of ms, a window the poll below (1 ms) sees; no test-only hook in the trainer
KILL = ["--data", "digits", "--batch", "8", "--hidden", "128", "--depth", "4", "--heads", "2", "--patch", "2",
        "--threads", "1", "--warmup", "2", "--ckpt-every", "1", "--sample-every", "0", "--sample-steps", "1",
        "--grid-cols", "1"]


def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "routefx.train", *KILL, "--out", str(out), *extra]


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def _half_written(path) -> bool:
    try:
        load_checkpoint(path)
    except CheckpointError:
        return True
    return False  # complete, killed before os.replace: not the case we are after


def _kill_during_a_write(out, attempts=5):
    """Train; once checkpoint.pt exists, SIGKILL the process as soon as a temp file has bytes in it
    (a torch.save in progress). Retries (resuming) until a kill leaves a half-written temp file.
    Returns (attempts used, the temp file left)."""
    for attempt in range(1, attempts + 1):
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        proc = subprocess.Popen(_train_cmd(out, "--steps", "100000", *resume), env=_env(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, killed = time.time() + 120, False
        try:
            while time.time() < deadline and proc.poll() is None:
                if (out / "checkpoint.pt").exists() and any(_size(t) for t in stale_temp_files(str(out))):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.001)
        finally:
            if not killed:
                proc.kill()
            text = proc.communicate(timeout=60)[0]
        assert killed, f"the trainer never wrote a checkpoint, or exited:\n{text[-3000:]}"
        assert proc.returncode == -signal.SIGKILL
        left = stale_temp_files(str(out))
        if len(left) == 1 and _size(left[0]) and _half_written(left[0]):
            return attempt, left[0]
        remove_stale_temps(str(out))  # the write finished (or had not begun) before the kill: again
    pytest.fail(f"no kill landed inside a checkpoint write in {attempts} attempts")


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_resume_is_bit_exact(tmp_path):
    out, ref = tmp_path / "killed", tmp_path / "whole"
    attempts, left = _kill_during_a_write(out)
    sizes = _size(left), _size(out / "checkpoint.pt")  # the temp file cannot be loaded (checked)
    ck = load_checkpoint(str(out / "checkpoint.pt"))  # the last complete checkpoint: intact
    done = ck["step"]
    assert done >= 1
    assert len(read_metrics(out / "metrics.jsonl")) >= done  # the log may be a step ahead

    final = done + 3
    proc = subprocess.run(_train_cmd(out, "--steps", str(final), "--resume"), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed at step {done}" in proc.stdout
    assert f"removed {left}" in proc.stdout and stale_temp_files(str(out)) == []

    assert main(KILL + ["--steps", str(final), "--out", str(ref)]) == 0  # never interrupted
    a, b = load_checkpoint(str(ref / "checkpoint.pt")), load_checkpoint(str(out / "checkpoint.pt"))
    assert a["step"] == b["step"] == final
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = read_metrics(ref / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lb] == list(range(1, final + 1))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    print(f"\nkill landed mid-write on attempt {attempts} ({sizes[0]} of ~{sizes[1]} bytes written); "
          f"resumed from step {done} to {final}")


def test_remove_stale_temps_touches_only_interrupted_writes(tmp_path):
    save_checkpoint(str(tmp_path / "checkpoint.pt"), {"step": 1})
    keep = ["checkpoint.pt", "metrics.jsonl", ".tmp-notes.txt", "tmp-x.pt"]
    for name in keep[1:]:
        (tmp_path / name).write_text("x")
    (tmp_path / f"{TEMP_PREFIX}dir.pt").mkdir()  # not a file: left alone
    stale = [tmp_path / f"{TEMP_PREFIX}a1b2.pt", tmp_path / f"{TEMP_PREFIX}zz.pt"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04 half a zip")
    assert stale_temp_files(str(tmp_path)) == sorted(map(str, stale))
    assert remove_stale_temps(str(tmp_path)) == sorted(map(str, stale))
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [f"{TEMP_PREFIX}dir.pt"])
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1
    assert remove_stale_temps(str(tmp_path / "missing")) == []


def test_a_fresh_run_removes_stale_temps_before_its_first_save(tmp_path):
    """Killed during the FIRST save there is no checkpoint.pt to resume from: a new run in the
    folder removes the temp file all the same (before writing its own)."""
    stale = tmp_path / f"{TEMP_PREFIX}killed.pt"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    tiny = ["--data", "digits", "--batch", "8", "--hidden", "32", "--depth", "2", "--heads", "2", "--patch", "2",
            "--threads", "1", "--sample-every", "0", "--sample-steps", "1", "--grid-cols", "1"]
    assert main(tiny + ["--steps", "1", "--out", str(tmp_path)]) == 0
    assert not stale.exists() and stale_temp_files(str(tmp_path)) == []
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1
