"""`python -m routefx.inspect`: CLI on registry backbones and user files, JSON, FLOPs, errors."""
import json
import re
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import routefx
import routefx.backbones
from routefx.inspect import inspect_model, main, parse_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "routefx.inspect", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


USER_FILE = textwrap.dedent('''
    import torch
    import timm

    def build_model():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                 patch_size=8, depth=6)

    def example_inputs():
        return (torch.randn(2, 3, 32, 32),)
''')

UNTRACEABLE = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(4)])

        def forward(self, x):
            rows = [x[:, i] for i in range(int(x[0, 0, 0] > 0) + 1)]  # a count from VALUES: untraceable
            x = torch.stack(rows, dim=1)
            for b in self.blocks:
                x = b(x)
            return x

    def example_inputs():
        return (torch.randn(2, 5, 8),)
''')


def test_cli_on_dit_registry_file():
    r = run_cli("backbones/dit.py", "--factory", "DiT-T/2", "--route", "1,4,0.5", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [b["module"] for b in rep["chain"]] == [f"blocks.{i}" for i in range(6)]
    (route,) = rep["routes"]
    assert route["gathered"][0]["tensor"] == "blocks_0" and route["scattered"][0]["base"] == "blocks_0"
    assert 0.3 < route["fwd_ratio"] < 1
    for key in ("model", "parameters", "capture", "chain", "other_chains", "tokens", "dense", "routes", "uncounted"):
        assert key in rep
    assert rep["uncounted"] == {} and rep["dense"]["dim"] == 64
    assert abs(route["fwd_ratio"] - route["estimated_ratio"]) < 0.03  # 16 tokens: the head and embeddings weigh
    for key in ("route", "blocks", "kept_tokens", "gathered", "scattered", "passed", "fwd_flops",
                "step_flops", "fwd_ratio", "step_ratio", "estimated_ratio", "predicted_step_time_ratio"):
        assert key in route


@pytest.mark.parametrize("path, factory", [("backbones/uvit.py", "U-ViT-T/2")])
def test_cli_text_on_uvit_with_graph(tmp_path, path, factory):
    out = tmp_path / "g.png"
    r = run_cli(path, "--factory", factory, "--graph", str(out), "--check")
    assert r.returncode == 0, r.stderr
    assert "block chain (7 blocks" in r.stdout and "2 protected prefix" in r.stdout
    assert "all ops with compute counted" in r.stdout and "TREAD.md section 6 estimate" in r.stdout
    assert "'eval_equals_original': True" in r.stdout
    assert out.stat().st_size > 1000


def test_cli_on_user_file_with_default_route(tmp_path):
    f = tmp_path / "user_model.py"
    f.write_text(USER_FILE)
    r = run_cli(str(f), "--json", "--graph", str(tmp_path / "g.dot"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tokens"] == {"num_tokens": 17, "prefix": 1, "batch": 2, "stream": rep["tokens"]["stream"]}
    assert rep["routes"][0]["route"] == [2, 3, 0.5]  # routefx.route.paper_route on 6 blocks (>= 2 routed)
    assert (tmp_path / "g.dot").read_text().startswith("digraph")


def test_cli_explains_untraceable_model(tmp_path):
    f = tmp_path / "bad_model.py"
    f.write_text(UNTRACEABLE)
    r = run_cli(str(f))
    assert r.returncode == 2
    assert re.search(r"bad_model.py:\d+ in forward: `rows = \[x", r.stderr), r.stderr
    assert "leaf_modules" in r.stderr and "Data-dependent control flow" in r.stderr
    assert "Traceback" not in r.stderr
    assert "Traceback" in run_cli(str(f), "--debug").stderr


def test_flop_ratio_equals_flop_counter_on_routed_model():
    torch.manual_seed(0)
    model = routefx.backbones.create("DiT-T/2", input_size=8, num_classes=10)
    args = routefx.backbones.example_inputs(model, 2)
    rep = inspect_model(model, args, {}, [routefx.Route(1, 4, 0.5)])
    routed = routefx.apply(model, [(1, 4, 0.5)], example_inputs=args)  # capture outside the counter
    with FlopCounterMode(display=False) as fc:
        routed(*args)
    with FlopCounterMode(display=False) as dense, routefx.unrouted(model):
        model(*args)
    assert rep["routes"][0]["fwd_ratio"] == fc.get_total_flops() / dense.get_total_flops()


def test_inputs_spec_and_bad_spec():
    _, kw = parse_inputs(["x=2x4x8x8", "t=2", "y=2:long"])
    assert kw["x"].shape == (2, 4, 8, 8) and kw["y"].dtype == torch.long
    with pytest.raises(routefx.RouteError, match="NAME=2x4x32x32"):
        parse_inputs(["x2x4"])
    assert main(["backbones/dit.py", "--factory", "DiT-T/2", "--route", "1-4"]) == 2


def test_cli_on_a_stock_diffusers_transformer():
    """docs/examples/flux_tiny.py builds a tiny FluxTransformer2DModel: inspect shows its two block
    types as one chain and routes image tokens only (the README's diffusers section)."""
    r = run_cli("docs/examples/flux_tiny.py", "--route", "1,2,0.5", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [b["module"] for b in rep["chain"]] == ["transformer_blocks.0", "transformer_blocks.1",
                                                   "single_transformer_blocks.0", "single_transformer_blocks.1"]
    route = rep["routes"][0]
    assert route["num_tokens"] == 64 and route["kept_tokens"] == 32 and route["shared_indices"] is True
    assert [g["kind"] for g in route["gathered"]] == ["token", "table0", "table0"]
