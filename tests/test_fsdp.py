"""FSDP2 (fully_shard, gloo, 2 processes on CPU) over a routed tiny DiT, in every order
(tests/fsdp_worker.py): gradients against a single-process routed reference at each rank's data
and routing seed, DCP round trip, a full state dict into a plain DiT."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXACT = ("shard_then_apply", "apply_then_shard", "extra_units", "checkpointed", "meta", "bf16")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "fsdp_worker.py"), str(out), *EXACT]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("case", EXACT)
def test_fsdp2_gradients_equal_the_single_process_reference(ranks, case):
    """Shard then apply, apply then shard, extra units on modules routefx traces through
    otherwise (t_embedder, y_embedder, final_layer), activation checkpointing before sharding,
    a model built on the meta device, routed, sharded, materialised (`to_empty`) and loaded, and
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) against a reference whose
    parameters and float inputs are bf16 (DiT's float32 timestep embedding meets bf16 weights):
    no warm-up call, the first step's full gradients equal the reference's, the same tokens are
    drawn, and the parameter names are the plain model's."""
    for rank, r in enumerate(ranks):
        got = r[case]
        assert "error" not in got, got.get("trace")
        assert got["max_err"] < 1e-5, (rank, got["max_err"])
        assert got["ids"] == got["ref_ids"] and got["names_same"]
    assert ranks[0][case]["ids"] != ranks[1][case]["ids"], "each rank draws its own tokens"


def test_fsdp2_checkpoints(ranks):
    """DCP save / load into a freshly sharded routed model restores every tensor; the full state
    dict (get_model_state_dict, full_state_dict=True) has the plain DiT's keys and loads into it
    strictly."""
    assert all(r["shard_then_apply"]["dcp_round_trip"] for r in ranks)
    assert ranks[0]["shard_then_apply"]["full_state_dict_into_plain"]
    assert ranks[0]["shard_then_apply"]["state_dict_keys_plain"]
