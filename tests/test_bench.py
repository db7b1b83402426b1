"""The speed benchmark runs end to end on a tiny DiT and reports every field (no timed checks)."""
import json
import math
import subprocess
import sys

import pytest

from routefx import bench

ARM_FIELDS = ("median_ms", "min_ms", "times_ms", "warmup_ms", "peak_mem_bytes", "flops")
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
                        "apply_s", "eval", "memory_method"}
    assert res["config"]["routes"] == [[2, 2, 0.5]]  # the paper rule for 6 blocks
    assert {"torch", "device_name", "cpu_count", "threads"} <= set(res["env"])
    assert (res["blocks"], res["tokens"]) == (6, 16)
    for arm in bench.ARMS:
        a = res["arms"][arm]
        assert set(ARM_FIELDS) <= set(a), arm
        assert len(a["times_ms"]) == 2 and len(a["warmup_ms"]) == 1
        assert all(_positive(a[k]) for k in ("median_ms", "min_ms", "flops")), arm
        assert a["peak_mem_bytes"] >= 0
    assert returned["ratios"] == res["ratios"]


def test_ratios_are_positive_and_finite(result):
    _, res = result
    for k in RATIOS:
        assert _positive(res["ratios"][k]), k
    for v in (res["flop_ratio_estimate"], res["apply_s"], res["eval"]["ratio"],
              res["eval"]["dense_ms"], res["eval"]["routefx_ms"]):
        assert _positive(v)
    assert res["ratios"]["flop_ratio"] < 1  # routing removed work the counter saw


def test_no_hand_arm_off_the_dit_family(tmp_path):
    res = bench.main(["--backbone", "U-ViT-T/2", "--input-size", "8", "--batch", "2", "--steps", "1",
                      "--warmup", "0", "--threads", "1", "--routes", "1,3,0.5"])
    assert res["arms"]["hand"] is None and res["ratios"]["routefx_over_hand"] is None
    assert _positive(res["ratios"]["routefx_over_dense"])


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "routefx.bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--routes" in proc.stdout
