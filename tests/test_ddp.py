"""DDP (gloo, 2 processes on CPU) over routed DiT, U-ViT and SiT."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_ddp_identical_parameters_different_routing(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "ddp_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert set(a) == {"DiT-T/2", "U-ViT-T/2", "SiT-T/2"}
    for name in a:
        assert a[name]["param_head"] == b[name]["param_head"], f"{name}: ranks diverged"
        assert a[name]["param_sum"] == b[name]["param_sum"]
        assert a[name]["ids"] != b[name]["ids"], f"{name}: ranks routed the same tokens"
