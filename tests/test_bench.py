"""The speed benchmark runs end to end on a tiny DiT and reports every field (no timed checks)."""
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from routefx import bench

ARM_FIELDS = ("median_ms", "min_ms", "times_ms", "warmup_ms", "peak_mem_bytes", "flops", "flops_uncounted")
RATIOS = ("routefx_over_dense", "hand_over_dense", "routefx_over_hand", "flop_ratio", "efficiency",
          "hand_efficiency")


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "b.json"
    returned = bench.main(["--backbone", "DiT-T/2", "--input-size", "8", "--batch", "2", "--steps", "2",
                           "--warmup", "1", "--threads", "1", "--json", str(path)])
    return returned, json.loads(path.read_text())


def test_json_has_every_field(result):
    returned, res = result
    assert set(res) == {"config", "env", "blocks", "tokens", "arms", "ratios", "flop_ratio_estimate",
                        "flop_ratio_estimate_linear", "apply_s", "compiled_graphs", "eval", "memory_method"}
    assert res["config"]["routes"] == [[2, 2, 0.5]]  # the paper rule for 6 blocks
    assert {"torch", "device_name", "cpu_count", "threads"} <= set(res["env"])
    assert (res["blocks"], res["tokens"]) == (6, 16)
    for arm in bench.ARMS:
        a = res["arms"][arm]
        assert set(ARM_FIELDS) <= set(a), arm
        assert len(a["times_ms"]) == 2 and len(a["warmup_ms"]) == 1
        assert all(_positive(a[k]) for k in ("median_ms", "min_ms", "flops")), arm
        assert a["peak_mem_bytes"] >= 0 and a["flops_uncounted"] == {}
    assert returned["ratios"] == res["ratios"]


def test_ratios_are_positive_and_finite(result):
    _, res = result
    for k in RATIOS:
        assert _positive(res["ratios"][k]), k
    for v in (res["flop_ratio_estimate"], res["apply_s"], res["eval"]["ratio"],
              res["eval"]["dense_ms"], res["eval"]["routefx_ms"]):
        assert _positive(v)
    assert res["ratios"]["flop_ratio"] < 1  # routing removed work the counter saw
    # TREAD.md section 6 with attention, blocks only (embeddings and head are ~1% here)
    assert abs(res["ratios"]["flop_ratio"] - res["flop_ratio_estimate"]) < 0.01


def test_flops_include_attention_on_cpu():
    # DiT-T/2 at 1024 tokens (d=64): attention is 4N / (24d + 4N) = 73% of the block FLOPs, and
    # FlopCounterMode alone counted none of it on a CPU
    torch.manual_seed(0)
    model = bench._create("DiT-T/2", 64, "cpu")
    inputs = bench.example_inputs(model, 1)
    counted = bench.arm_flops(model, inputs, bench._amp("cpu", "float32"))
    attention = sum(v for k, v in counted.by_op.items() if "attention" in k)
    assert abs(attention / counted.total - 4096 / (24 * 64 + 4096)) < 0.01 and counted.uncounted == {}
    assert all(p.grad is None for p in model.parameters())
    routes = bench.resolve_routes([(2, 4, 0.5)], 6)
    assert bench.flop_ratio_estimate(6, routes, 1024, 64) < bench.linear_flop_ratio(6, routes) - 0.05


def test_no_hand_arm_off_the_dit_family(tmp_path):
    res = bench.main(["--backbone", "U-ViT-T/2", "--input-size", "8", "--batch", "2", "--steps", "1",
                      "--warmup", "0", "--threads", "1", "--routes", "1,3,0.5"])
    assert res["arms"]["hand"] is None and res["ratios"]["routefx_over_hand"] is None
    assert _positive(res["ratios"]["routefx_over_dense"])


def test_run_specs_and_modes():
    runs = bench._runs(bench.parse_args(["--run", "DiT-B/2:2,8,0.5:9,10,0.25", "--run", "DiT-XL/2",
                                         "--modes", "eager", "compiled", "regional"]))
    assert [(r.backbone, r.routes, r.mode, r.compile) for r in runs] == [
        ("DiT-B/2", [(2, 8, 0.5), (9, 10, 0.25)], "eager", False), ("DiT-XL/2", None, "eager", False),
        ("DiT-B/2", [(2, 8, 0.5), (9, 10, 0.25)], "compiled", True), ("DiT-XL/2", None, "compiled", True),
        ("DiT-B/2", [(2, 8, 0.5), (9, 10, 0.25)], "regional", True), ("DiT-XL/2", None, "regional", True)]
    (one,) = bench._runs(bench.parse_args(["--backbone", "DiT-S/2", "--routes", "1,3,0.5", "--compile"]))
    assert (one.backbone, one.routes, one.mode) == ("DiT-S/2", [(1, 3, 0.5)], "compiled")


def test_several_runs_share_one_process(tmp_path, monkeypatch):
    # dynamo without inductor: the compiled code path, without minutes of C++ compiling
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    res = bench.main(["--run", "DiT-T/2", "--run", "U-ViT-T/2:1,3,0.5", "--modes", "eager", "compiled",
                      "regional", "--input-size", "8", "--batch", "2", "--steps", "1", "--warmup", "1",
                      "--threads", "1", "--json-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "all.json")])
    assert [(r["config"]["backbone"], r["config"]["routes"], r["config"]["mode"]) for r in res] == [
        ("DiT-T/2", [[2, 2, 0.5]], "eager"), ("U-ViT-T/2", [[1, 3, 0.5]], "eager"),
        ("DiT-T/2", [[2, 2, 0.5]], "compiled"), ("U-ViT-T/2", [[1, 3, 0.5]], "compiled"),
        ("DiT-T/2", [[2, 2, 0.5]], "regional"), ("U-ViT-T/2", [[1, 3, 0.5]], "regional")]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        f"{m}_{mode}.json" for m in ("dit-t2_2-2-0.5", "u-vit-t2_1-3-0.5") for mode in ("compiled", "eager", "regional")]
    assert json.loads((tmp_path / "runs" / "dit-t2_2-2-0.5_compiled.json").read_text())["ratios"] == res[2]["ratios"]
    assert [r["config"] for r in json.loads((tmp_path / "all.json").read_text())] == [r["config"] for r in res]
    for r in res:
        assert _positive(r["ratios"]["routefx_over_dense"]) and _positive(r["eval"]["ratio"])
    # eager compiles nothing; whole-model compiles give each arm its own graphs; regional compiles
    # static block graphs, whatever the number of blocks and arms: one for the kept token count and
    # two for the full count (block 0 gets the patch embedding's transposed view, later blocks a
    # contiguous tensor: dynamo guards on strides)
    eager, whole, regional = (res[i]["compiled_graphs"] for i in (0, 2, 4))
    assert (eager, regional) == (0, 3) and whole >= 3


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "routefx.bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--routes" in proc.stdout


@pytest.mark.parametrize("env, runs", [
    ({}, [("DiT-B/2", "eager"), ("DiT-XL/2", "eager"), ("DiT-B/2", "regional"), ("DiT-XL/2", "regional"),
          ("DiT-B/2", "compiled")]),
    ({"WHOLE_XL": "1"}, [("DiT-B/2", "eager"), ("DiT-XL/2", "eager"), ("DiT-B/2", "regional"),
                         ("DiT-XL/2", "regional"), ("DiT-B/2", "compiled"), ("DiT-XL/2", "compiled")]),
    ({"COMPILE": "0"}, [("DiT-B/2", "eager"), ("DiT-XL/2", "eager")]),
])
def test_gpu_script_asks_the_bench_for_the_issue_shapes(tmp_path, env, runs):
    # benchmarks/gpu.sh with a stand-in interpreter that records its arguments: every call must
    # parse, and together they must cover the runs asked for (no GPU needed to check the script)
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{calls}"\necho === >> "{calls}"\n')
    stub.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
                          env={**os.environ, "PYTHON": str(stub), **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = []
    for call in calls.read_text().split("===\n")[:-1]:
        argv = call.splitlines()
        assert argv[:2] == ["-m", "routefx.bench"]
        args = bench.parse_args(argv[2:])
        assert (args.device, args.dtype, args.batch, args.input_size) == ("cuda", "bfloat16", 32, 32)
        assert args.json_dir == str(tmp_path / "out") and args.steps >= 5
        for one in bench._runs(args):
            assert one.routes == {"DiT-B/2": [(2, 8, 0.5)], "DiT-XL/2": [(2, 20, 0.5)]}[one.backbone]
            seen.append((one.backbone, one.mode))
    assert seen == runs
