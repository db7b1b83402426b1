"""The training job: end to end, exact resume, masked loss, routing guidance, DDP, checkpoints.

Runs are tiny (sklearn digits, 8x8, a DiT of width 32) so the file stays well under 90 s on 2
CPU cores; the torchrun test dominates (process-group start-up).
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import routefx
from routefx import Route, RouteInfo
from routefx.backbones import UViT, create
from routefx.backbones.dit import DiT
from routefx.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from routefx.diffusion import Guidance, RectifiedFlow, sample
from routefx.losses import masked_route_loss, patch_errors
from routefx.models import build
from routefx.train import main
from routefx.viz import read_metrics

TINY = ["--data", "digits", "--batch", "16", "--hidden", "32", "--depth", "4", "--heads", "2",
        "--patch", "2", "--threads", "1", "--sample-steps", "2", "--grid-cols", "2", "--warmup", "2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    """`main` sets torch's thread count; give other test files theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train(out, *extra):
    return main(TINY + ["--out", str(out), *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train(out, "--steps", "4", "--sample-every", "2", "--ckpt-every", "2") == 0
    return out


# -- end to end -----------------------------------------------------------------------------
def test_end_to_end_writes_everything(tiny_run):
    for name in ["checkpoint.pt", "metrics.jsonl", "samples.png", "loss.png", "samples/step_000002.png"]:
        assert (tiny_run / name).stat().st_size > 0, name
    rows = read_metrics(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "it_s", "wall"} <= set(rows[0])
    ck = load_checkpoint(tiny_run / "checkpoint.pt")
    assert ck["step"] == 4 and ck["routes"] == [[2, 2, 0.5]]  # TREAD's rule for 4 blocks
    assert {"torch", "numpy", "python", "routing"} <= set(ck["rng"][0])
    assert ck["data"] == {"epoch": 0, "index": 4}


def test_checkpoint_loads_into_plain_backbone(tiny_run):
    ck = load_checkpoint(tiny_run / "checkpoint.pt")
    plain = DiT(**ck["config"]["kwargs"])
    plain.load_state_dict(ck["model"], strict=True)
    plain.load_state_dict(ck["ema"], strict=True)
    assert build(ck["config"]).load_state_dict(ck["model"], strict=True) is not None


@pytest.mark.parametrize("name", ["SiT-T/2", "U-ViT-T/2"])
def test_registry_backbone_checkpoint_loads_plain(tmp_path, name):
    assert main(["--data", "digits", "--batch", "8", "--steps", "2", "--backbone", name, "--threads", "1",
                 "--sample-steps", "1", "--grid-cols", "1", "--out", str(tmp_path)]) == 0
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    if name.startswith("SiT"):
        plain = create(name, input_size=8, in_channels=1, num_classes=10)
    else:  # U-ViT-T/2's factory fixes in_chans=4: the size is rebuilt as UViT(...), null class added
        plain = UViT(**ck["config"]["kwargs"])
        assert ck["config"]["kwargs"]["num_classes"] == 11 and ck["config"]["kwargs"]["in_chans"] == 1
    plain.load_state_dict(ck["model"], strict=True)


# -- resume ---------------------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train(whole, "--steps", "6", "--sample-every", "0") == 0
    assert train(part, "--steps", "3", "--sample-every", "0") == 0
    assert train(part, "--steps", "6", "--sample-every", "0", "--resume") == 0
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise, resumed steps 4..6 included
    ca, cb = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
        assert torch.equal(ca["ema"][k], cb["ema"][k]), k


def test_refuses_to_overwrite_a_run(tiny_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(tiny_run, out)
    with pytest.raises(CheckpointError, match="--resume"):
        train(out, "--steps", "1")


# -- checkpoints that cannot be used ----------------------------------------------------------
def test_corrupt_checkpoint_clear_error_file_intact(tiny_run, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(tiny_run, out)
    ck = out / "checkpoint.pt"
    ck.write_bytes(b"not a checkpoint" * 10)
    before = ck.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt") as e:
        train(out, "--steps", "6", "--resume")
    assert str(ck) in str(e.value)
    assert ck.read_bytes() == before


def test_mismatched_checkpoint_clear_error_file_intact(tiny_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(tiny_run, out)
    ck = out / "checkpoint.pt"
    before = ck.read_bytes()
    with pytest.raises(CheckpointError) as e:
        main(TINY + ["--out", str(out), "--steps", "6", "--resume", "--hidden", "48"])
    assert str(ck) in str(e.value) and "another model" in str(e.value)
    assert ck.read_bytes() == before


def test_failed_save_leaves_old_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: 0})  # cannot be pickled mid-write
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind


# -- masked loss --------------------------------------------------------------------------------
def test_masked_loss_equals_hand_computed_value():
    pred = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) / 10
    target = torch.zeros(2, 1, 4, 4)
    mae_target = torch.ones(2, 1, 4, 4)
    # 2x2 patches in raster order: patch 0 = rows 0-1 cols 0-1, patch 1 = rows 0-1 cols 2-3, ...
    e = [[(pred[b, 0, 2 * (p // 2):2 * (p // 2) + 2, 2 * (p % 2):2 * (p % 2) + 2] ** 2).mean().item()
          for p in range(4)] for b in range(2)]
    m = [[((pred[b, 0, 2 * (p // 2):2 * (p // 2) + 2, 2 * (p % 2):2 * (p % 2) + 2] - 1) ** 2).mean().item()
          for p in range(4)] for b in range(2)]
    # route A keeps patches {0, 3} / {1, 2}; route B keeps {0, 1, 2} / {3, 0, 1}; U-ViT-like prefix 1
    a = RouteInfo(Route(0, 1, 0.5), torch.tensor([[0, 3], [1, 2]]), 4, 0)
    b = RouteInfo(Route(2, 3, 0.25), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]]), 5, 1)
    proc_a = (e[0][0] + e[0][3] + e[1][1] + e[1][2]) / 4
    proc_b = (e[0][0] + e[0][1] + e[0][2] + e[1][0] + e[1][1] + e[1][3]) / 6
    byp_a = (m[0][1] + m[0][2] + m[1][0] + m[1][3]) / 4
    byp_b = (m[0][3] + m[1][2]) / 2
    want = (proc_a + proc_b) / 2 + 0.3 * (byp_a + byp_b) / 2
    got = masked_route_loss(pred, target, [a, b], 2, mae_target=mae_target, mae_lambda=0.3)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert torch.allclose(patch_errors(pred, target, 2), torch.tensor(e))
    w = torch.tensor([2.0, 0.5])
    want_w = (2 * (e[0][0] + e[0][3]) + 0.5 * (e[1][1] + e[1][2])) / 4
    assert masked_route_loss(pred, target, [a], 2, weight=w).item() == pytest.approx(want_w, rel=1e-6)


def test_masked_loss_without_routes_is_plain_mse():
    pred, target = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.allclose(masked_route_loss(pred, target, [], 2), (pred - target).square().mean())


# -- routing guidance -------------------------------------------------------------------------
def test_routing_guidance_matches_two_call_formula():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
                num_classes=10, learn_sigma=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # undo adaLN-zero so routing changes the output
    gen = torch.Generator().manual_seed(5)
    routed = routefx.apply(model, [(1, 2, 0.5)], generator=gen).eval()
    y, noise = torch.tensor([3, 7]), torch.randn(2, 1, 8, 8)
    rf, g = RectifiedFlow(), Guidance(routing=True, scale=1.5, strong=0.3, weak=0.7)
    got = sample(routed, rf, y, (1, 8, 8), steps=2, guidance=g, noise=noise.clone())

    gen.manual_seed(5)
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in [(1.0, 0.5), (0.5, 0.0)]:
            tt = torch.full((2,), t * 1000)
            with routefx.force_routing(routed, ratio=0.3):
                strong = routed(x, tt, y)
            with routefx.force_routing(routed, ratio=0.7):
                weak = routed(x, tt, y)
            x = x + (t_next - t) * (weak + 1.5 * (strong - weak))
    assert torch.allclose(got, x, atol=1e-6)
    assert not torch.allclose(got, sample(routed, rf, y, (1, 8, 8), steps=2, noise=noise.clone()))


# -- signals and DDP (subprocesses) ----------------------------------------------------------------
def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def test_ddp_two_ranks_same_params_different_routing(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "routefx.train", *TINY, "--steps", "3", "--sample-every", "0",
           "--debug-json", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "debug" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    assert r0["params_sha256"] == r1["params_sha256"]
    assert r0["routing_ids"] != r1["routing_ids"]
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 3
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3  # rank 0 alone logs


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    import signal
    import time
    cmd = [sys.executable, "-m", "routefx.train", *TINY, "--steps", "100000", "--sample-every", "0",
           "--ckpt-every", "0", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "metrics.jsonl", time.time() + 60
    while time.time() < deadline and (not log.exists() or len(read_metrics(log)) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:]
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == len(read_metrics(log)) >= 2
    assert "--resume" in out


def test_compile_blocks_trains_like_eager(tmp_path):
    # regional compilation (inductor) of every block: the routing graph stays eager, so the same
    # tokens are routed and the losses match the eager run's; checkpoints keep the plain keys.
    # DiT's zero-initialised gates make early losses blind to routing: by steps 4-8 another route
    # (1,1,0.25 instead of 1,1,0.5) moves them by ~1e-4 relative, 10x this test's tolerance
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        assert train(eager, "--steps", "8", "--sample-every", "0", "--depth", "3") == 0
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
        assert train(compiled, "--steps", "8", "--sample-every", "0", "--depth", "3", "--compile-blocks") == 0
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    a, b = read_metrics(eager / "metrics.jsonl"), read_metrics(compiled / "metrics.jsonl")
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra["loss"], rb["loss"])
    assert graphs >= 1, "the compiled run ran compiled blocks"
    ca, cb = load_checkpoint(eager / "checkpoint.pt"), load_checkpoint(compiled / "checkpoint.pt")
    assert list(ca["model"]) == list(cb["model"])
    for k in ca["model"]:
        assert torch.allclose(ca["model"][k], cb["model"][k], atol=1e-5, rtol=1e-4), k


# -- issue 14: gradient accumulation, bf16 on the CPU, FSDP2 --------------------------------------
def test_grad_accum_2_equals_one_step_over_the_double_batch(tmp_path):
    """`--batch 8 --grad-accum 2` (two micro-batches of 8) and `--batch 16`: the same samples,
    noise, labels and tokens, so the same loss and weights after a step (float rounding aside)."""
    a, b = tmp_path / "accum", tmp_path / "double"
    assert train(a, "--steps", "2", "--sample-every", "0", "--batch", "8", "--grad-accum", "2") == 0
    assert train(b, "--steps", "2", "--sample-every", "0", "--batch", "16") == 0
    la, lb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"]), (la, lb)
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.allclose(ca["model"][k], cb["model"][k], atol=1e-5, rtol=1e-4), k
    with pytest.raises(SystemExit, match="--grad-accum 0"):
        train(tmp_path / "bad", "--grad-accum", "0")


def test_bf16_on_the_cpu_trains(tmp_path):
    """`--precision bf16` is bf16 autocast on the CPU too: it trains (finite, different from fp32)."""
    assert train(tmp_path / "bf16", "--steps", "2", "--sample-every", "0", "--precision", "bf16") == 0
    assert train(tmp_path / "fp32", "--steps", "2", "--sample-every", "0", "--precision", "fp32") == 0
    lo, hi = read_metrics(tmp_path / "bf16" / "metrics.jsonl"), read_metrics(tmp_path / "fp32" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in lo) and [r["loss"] for r in lo] != [r["loss"] for r in hi]
    assert abs(lo[0]["loss"] - hi[0]["loss"]) < 0.05 * hi[0]["loss"]


def _torchrun_train(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "routefx.train", *TINY, "--sample-every", "0", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fsdp_resume_is_bit_exact(tmp_path):
    """`--fsdp` under torchrun (2 ranks): sharded DCP checkpoints; a run stopped at step 2 and
    resumed logs the same losses, bit for bit, as an uninterrupted 4-step run, and ends with the
    same weights; the checkpoint's full weights load into the plain backbone; only the newest
    DCP folder is kept. Without torchrun, and resuming a DDP checkpoint with --fsdp, are refused."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    _torchrun_train(whole, "--fsdp", "--steps", "4", "--grad-accum", "2", "--debug-json")
    _torchrun_train(part, "--fsdp", "--steps", "2", "--grad-accum", "2", "--ckpt-every", "1")
    assert sorted(p.name for p in part.iterdir() if ".dcp-" in p.name) == ["checkpoint.dcp-0000002"]
    _torchrun_train(part, "--fsdp", "--steps", "4", "--grad-accum", "2", "--resume", "--debug-json")
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    da, db = (json.loads((d / "debug" / "rank0.json").read_text()) for d in (whole, part))
    assert da["params_sha256"] == db["params_sha256"] and da["routing_ids"] == db["routing_ids"]
    ck = load_checkpoint(whole / "checkpoint.pt")
    build(ck["config"]).load_state_dict(ck["model"])  # strict: the plain backbone's keys
    with pytest.raises(SystemExit, match="torchrun"):
        train(tmp_path / "one", "--fsdp")
    ddp = tmp_path / "ddp"
    _torchrun_train(ddp, "--steps", "1")
    cmd_out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "routefx.train", *TINY, "--sample-every", "0", "--out", str(ddp), "--fsdp",
                              "--steps", "2", "--resume"], env=_env(), capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
    assert cmd_out.returncode != 0 and "written without --fsdp" in cmd_out.stdout + cmd_out.stderr
