"""Dense vs routed training for the same wall-clock budget: `python -m routefx.compare`.

Two arms start from the same seed (same initial weights, same data order, same noise stream):
`dense` trains the plain backbone, `routed` the same backbone under TREAD routes. They run
**interleaved in one process** in slices of a few seconds, so a busy or throttled machine slows
both alike; each arm's clock counts only its own training steps (sampling and evaluation are
not on the clock). At every `--eval-every` minutes of an arm's clock its EMA model draws
class-conditional samples (same noise for both arms) that are scored with the cached MNIST
classifier of `routefx.evaluate`: label agreement and classifier Frechet distance (NOT Inception
FID). The report (`<out>/<name>.md`, a plot, final sample grids and the raw JSON) gives the
table, quality vs clock, and the clock speedup of the routed arm to reach the dense arm's final
Frechet distance.

Every option of `python -m routefx.train` is accepted and applies to both arms (routes: the
routed arm's; default TREAD's rule).

Example:
    python -m routefx.compare                                 # default DiT-mini, 20 min per arm
    python -m routefx.compare --minutes 2 --data digits --name smoke --out /tmp/cmp
    python -m routefx.compare --device cuda --backbone DiT-S/2 --batch 256 --routes 2,8,0.5 --minutes 20
"""
import argparse
import json
import os
import sys
import time

import torch

from . import evaluate
from .bench import _env
from .data import load_images
from .diffusion import Guidance, sample
from .train import parse_args, run_cli
from .trainer import Trainer
from .viz import save_grid

__all__ = ["main", "Arm", "reach_time", "run_arms"]


class Arm:
    """One training arm: its trainer, its clock (seconds of its own steps) and its evaluations."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.clock, self.rng, self.evals, self.step_s = 0.0, torch.get_rng_state(), [], []

    def train_for(self, seconds: float, until: float) -> None:
        """Train until this arm's clock has advanced by `seconds` or reached `until`."""
        torch.set_rng_state(self.rng)
        stop = min(self.clock + seconds, until)
        while self.clock < stop:
            t0 = time.perf_counter()
            loss = self.trainer.train_step()
            dt = time.perf_counter() - t0
            if loss != loss or loss in (float("inf"), float("-inf")):
                raise FloatingPointError(f"{self.name} arm: loss {loss} at step {self.trainer.step}")
            self.clock += dt
            self.step_s.append(dt)
        self.rng = torch.get_rng_state()


def _score(arm: Arm, labels, noise, reference, args, cfgs) -> tuple:
    """Scores of the arm's EMA model at each guidance scale; the first scale's are the headline."""
    t, res, imgs = arm.trainer, {"minutes": arm.clock / 60, "step": arm.trainer.step, "cfg": {}}, None
    for cfg in cfgs:
        guidance = Guidance(cfg=cfg, null_class=t.info.null_class)
        x = sample(t.ema.model, t.objective, labels.to(t.device), t.shape, steps=args.sample_steps,
                   sampler=args.sampler, guidance=guidance, noise=noise.to(t.device)).cpu()
        res["cfg"][str(cfg)] = {"label_agreement": evaluate.label_agreement(x, labels),
                                "frechet": evaluate.frechet_distance(x, reference)}
        imgs = x if imgs is None else imgs
    res.update(res["cfg"][str(cfgs[0])])
    return res, imgs


def reach_time(evals: list, target: float):
    """First clock minute at which `frechet` falls to `target` (linear between evaluations), or None."""
    prev = None
    for e in evals:
        if e["frechet"] <= target:
            if prev is None:
                return e["minutes"]
            a, b = prev, e
            w = (a["frechet"] - target) / max(a["frechet"] - b["frechet"], 1e-12)
            return a["minutes"] + w * (b["minutes"] - a["minutes"])
        prev = e
    return None


def run_arms(arms: list, minutes: float, every: float, slice_s: float, score, log=print) -> None:
    """Alternate the arms in slices (order flips each round) and score each at every `every` minutes."""
    budget, rnd = minutes * 60, 0
    marks = {a.name: every * 60 for a in arms}
    while any(a.clock < budget for a in arms):
        for arm in (arms if rnd % 2 == 0 else arms[::-1]):
            if arm.clock >= budget:
                continue
            arm.train_for(slice_s, min(marks[arm.name], budget))
            if arm.clock >= min(marks[arm.name], budget):
                arm.evals.append(score(arm))
                while marks[arm.name] <= arm.clock:  # a slow first step may pass several marks
                    marks[arm.name] += every * 60
                e = arm.evals[-1]
                log(f"[routefx.compare] {arm.name:6s} {e['minutes']:6.2f} min  step {e['step']:6d}  "
                    + "  ".join(f"cfg {c}: label agreement {v['label_agreement']:.3f} Frechet {v['frechet']:.2f}"
                                for c, v in e.get("cfg", {"-": e}).items()))
        rnd += 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routefx.compare", add_help=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--minutes", type=float, default=20.0, help="training clock per arm")
    p.add_argument("--eval-every", type=float, default=4.0, help="minutes of an arm's clock between scores")
    p.add_argument("--eval-samples", type=int, default=500, help="samples per score (split over classes)")
    p.add_argument("--slice", type=float, default=10.0, help="seconds an arm trains before the other one")
    p.add_argument("--score-cfg", type=float, nargs="+", default=[1.0, 2.0],
                   help="guidance scales to score at; the FIRST gives the headline Frechet distance")
    p.add_argument("--name", default=None, help="report name (default <backbone>-<data>-compare)")
    p.add_argument("--out", default=os.path.join("docs", "results"), help="folder of the report")
    return p


def _machine(device) -> str:
    env = _env(device)  # the same facts `routefx.bench` records
    if device.type == "cuda":
        return f"{env['device_name']}, torch {env['torch']}"
    return (f"{env['device_name']}, {env['cpu_count']} cores, {env['threads']} torch thread(s), "
            f"torch {env['torch']}, Python {env['python']}")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _plot(arms, path: str, title: str, opts_cfg: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for color, arm in zip(("C0", "C1"), arms):  # one colour per arm, one line style per cfg
        m = [e["minutes"] for e in arm.evals]
        axes[0].plot(m, [e["frechet"] for e in arm.evals], "o-", color=color, label=arm.name)
        for style, cfg in zip(("o-", "s--", "^:"), arm.evals[0]["cfg"] if arm.evals else {}):
            axes[1].plot(m, [e["cfg"][cfg]["label_agreement"] for e in arm.evals], style, color=color,
                         label=f"{arm.name}, cfg {cfg}")
    axes[0].set_ylabel("classifier Frechet distance (lower is better)")
    axes[0].set_title(f"cfg {opts_cfg}", fontsize=9)
    axes[0].set_yscale("log")
    axes[1].set_ylabel("label agreement")
    for ax in axes:
        ax.set_xlabel("training clock of the arm (minutes)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(arms, opts, args, machine: str, wall_min: float, partial: bool) -> str:
    dense, routed = arms
    t = routed.trainer
    ms = {a.name: 1000 * _median(a.step_s) for a in arms}
    target = dense.evals[-1]["frechet"] if dense.evals else None
    reach = reach_time(routed.evals, target) if target is not None else None
    routes = ", ".join(f"({r.start}, {r.end}, {r.ratio})" for r in t.routes)
    params = sum(p.numel() for p in t.model.parameters())
    lines = [f"# {opts.name}: dense vs routed at the same training clock" + (" (PARTIAL: interrupted)" if partial else ""),
             "",
             f"Made by `python -m routefx.compare {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}.",
             "",
             f"* Machine: {machine}.",
             f"* Model: {args.backbone}, {params / 1e6:.2f}M parameters, {t.info.depth} blocks, "
             f"{(t.shape[1] // t.info.patch_size) ** 2} tokens per image; data {args.data} {tuple(t.shape)}; "
             f"batch {args.batch}; AdamW lr {args.lr} (warm-up {args.warmup}); EMA {args.ema}; "
             f"objective {args.objective}; loss {args.loss}.",
             f"* Routed arm: routes {routes}. Dense arm: the same model, seed {args.seed}, data order and noise.",
             f"* Budget: {opts.minutes:g} minutes of training clock per arm, arms interleaved in "
             f"{opts.slice:g}-second slices in one process ({wall_min:.1f} minutes wall in all, scoring included).",
             f"* Scores every {opts.eval_every:g} clock minutes on {opts.eval_samples} EMA samples "
             f"({args.sampler}, {args.sample_steps} steps, at guidance scales {', '.join(map(str, opts.score_cfg))}, "
             f"the same noise for both arms; the headline numbers use cfg {opts.score_cfg[0]}): "
             f"label agreement of routefx's MNIST classifier, and the Frechet distance of its 128-d "
             f"features to {opts.eval_samples} held-out test images (not "
             f"Inception FID; {opts.eval_samples} other real test images score "
             f"{getattr(opts, 'real_frechet', float('nan')):.2f}, the floor at this sample size).",
             "",
             f"Median step time: dense {ms['dense']:.1f} ms, routed {ms['routed']:.1f} ms, "
             f"routed/dense **{ms['routed'] / ms['dense']:.3f}**. Steps taken: dense {dense.trainer.step}, "
             f"routed {routed.trainer.step}.",
             ""]
    if target is not None:
        g = opts.score_cfg[0]
        if reach is None:
            lines.append(f"**The routed arm did not reach the dense arm's final Frechet distance at cfg {g} "
                         f"({target:.2f}) within the budget.**")
        else:
            first = reach_time(dense.evals, target)  # the same rule for both arms (curves need not fall)
            lines.append(f"**Clock to first reach the dense arm's final Frechet distance at cfg {g} "
                         f"({target:.2f}): dense {first:.1f} min, routed {reach:.1f} min: speedup "
                         f"{first / reach:.2f}x.** (Linear interpolation between scores; the resolution "
                         f"is one scoring interval.)")
    cfgs = list(dense.evals[0]["cfg"]) if dense.evals else []
    head = ["clock min"] + [f"{a} {c}" for a in ("dense", "routed") for c in
                            ["step"] + [f"{m} cfg {g}" for g in cfgs for m in ("label agr.", "Frechet")]]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for d, r in zip(dense.evals, routed.evals):
        cells = [f"{d['minutes']:.1f}"]
        for e in (d, r):
            cells.append(str(e["step"]))
            for g in cfgs:
                cells += [f"{e['cfg'][g]['label_agreement']:.3f}", f"{e['cfg'][g]['frechet']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![quality vs clock]({opts.name}.png)", "",
              f"Final EMA samples (rows are classes): dense `{opts.name}-dense.png`, routed "
              f"`{opts.name}-routed.png`.", "",
              f"Raw numbers: `{opts.name}.json`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of `python -m routefx.compare` (see the module docstring)."""
    opts, rest = _parser().parse_known_args(argv)
    if opts.help:
        _parser().print_help()
        print("\nAll `python -m routefx.train` options apply to both arms:\n")
        parse_args(["--help"])
    t_start = time.time()
    dense_args = parse_args(rest + ["--no-routes"] if "--no-routes" not in rest else rest)
    if dense_args.routes:
        dense_args.routes = None
    routed_args = parse_args([a for a in rest if a != "--no-routes"])
    opts.name = opts.name or f"{routed_args.backbone}-{os.path.basename(os.path.normpath(routed_args.data))}-compare"
    cuda = routed_args.device.startswith("cuda") or (routed_args.device == "auto" and torch.cuda.is_available())
    device = (routed_args.device.replace("auto", "cuda") if cuda else "cpu")
    torch.set_num_threads(routed_args.threads or os.cpu_count() or 1)
    arms = [Arm("dense", Trainer(dense_args, device=device)), Arm("routed", Trainer(routed_args, device=device))]
    t = arms[1].trainer
    classes = min(t.data.num_classes, 10)
    per = max(1, opts.eval_samples // classes)
    labels = torch.arange(classes).repeat_interleave(per)
    noise = t.objective.prior((len(labels), *t.shape), torch.Generator().manual_seed(routed_args.seed + 7))
    test = load_images(routed_args.data, routed_args.image_size, "test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    reference = test.images[order[:len(labels)]]
    # the floor: other real test images scored like samples (Frechet of equal-size real sets)
    other = test.images[order[len(labels):2 * len(labels)]]
    opts.real_frechet = evaluate.frechet_distance(other, reference) if len(other) > 1 else float("nan")
    os.makedirs(opts.out, exist_ok=True)
    base = os.path.join(opts.out, opts.name)
    machine = _machine(torch.device(device))
    print(f"[routefx.compare] {opts.name}: {opts.minutes:g} min per arm, scored every {opts.eval_every:g} min | "
          f"routes {t.routes} | {machine}", flush=True)
    finals = {}

    def score(arm):
        result, imgs = _score(arm, labels, noise, reference, routed_args, opts.score_cfg)
        finals[arm.name] = imgs
        _dump(arms, opts, base)
        return result

    partial = False
    try:
        run_arms(arms, opts.minutes, opts.eval_every, opts.slice, score,
                 log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        partial = True
        print("[routefx.compare] interrupted: writing the report of what ran", flush=True)
    _dump(arms, opts, base)
    for name, imgs in finals.items():
        keep = imgs.view(classes, per, *imgs.shape[1:])[:, :8].flatten(0, 1)  # <= 8 per class
        save_grid(keep, f"{base}-{name}.png", rows=classes)
    _plot(arms, base + ".png", f"{opts.name}: dense vs routed {t.routes}", opts.score_cfg[0])
    with open(base + ".md", "w") as f:
        f.write(_report(arms, opts, routed_args, machine, (time.time() - t_start) / 60, partial))
    print(f"[routefx.compare] report {base}.md", flush=True)
    return 130 if partial else 0


def _dump(arms, opts, base: str) -> None:
    data = {"options": vars(opts), "argv": sys.argv[1:],
            "arms": {a.name: {"evals": a.evals, "step_s": a.step_s, "steps": a.trainer.step,
                              "routes": [vars(r) for r in a.trainer.routes]} for a in arms}}
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, base + ".json")


if __name__ == "__main__":
    run_cli("routefx.compare", main, ())
