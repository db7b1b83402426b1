"""Speed benchmark: full training steps of a dense backbone, routefx, and a hand-written TREAD.

Three arms share one set of parameters and one AdamW optimizer, and run interleaved
(A B C A B C ...) so that machine noise hits them alike:

* ``dense``: the original model in train mode;
* ``routefx``: ``routefx.apply(model, routes)`` in train mode;
* ``hand``: a hand-written TREAD forward over the DiT/SiT modules (absent for other backbones).

Modes: ``eager``; ``compiled``, each arm ``torch.compile``'d whole (three fwd+bwd compiles of the
full model); ``regional``, every block of the chain compiled in place
(``block.compile(dynamic=False)``), so the three arms and all the blocks share a few static block
graphs (per token count and input layout): the same kernels inside the blocks at a fraction of the
compile time, with the few ops between blocks (embedding, gathers, scatters, final layer) eager.

A step is forward + MSE loss + backward + ``AdamW.step``. The report gives median / min step
times, routed/dense and routefx/hand ratios, the FLOP ratio counted by ``routefx.flops.count_flops``
over one fwd+bwd (model FLOPs, attention included on every device), TREAD.md section 6's estimate
of it, efficiency (time speedup over FLOP speedup), peak memory per arm, the time of
``routefx.apply`` and the eval-mode forward ratio.

    python -m routefx.bench --backbone DiT-B/2 --input-size 32 --routes 2,8,0.5 --batch 16

Several runs share one process (imports, CUDA set-up and inductor's compile workers paid once):

    python -m routefx.bench --run DiT-B/2:2,8,0.5 --run DiT-XL/2:2,20,0.5 --modes eager regional \
        --input-size 32 --json-dir results
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import routefx
from routefx.backbones import create, example_inputs, names
from routefx.backbones.dit import DiT
from routefx.flops import count_flops, tread_flop_ratio, uncounted_line
from routefx.route import resolve_routes

__all__ = ["main", "run", "parse_args", "default_routes", "HandTread", "format_table", "arm_flops",
           "flop_ratio_estimate", "linear_flop_ratio"]

ARMS = ("dense", "routefx", "hand")
MODES = ("eager", "compiled", "regional")


#################################################################################
#                                 Configuration                                 #
#################################################################################

def _route(text: str) -> tuple:
    try:
        start, end, ratio = text.split(",")
        return int(start), int(end), float(ratio)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a route is START,END,RATIO (e.g. 2,8,0.5), got {text!r}")


def _run_spec(text: str) -> tuple:
    """`BACKBONE[:S,E,R[:S,E,R...]]` -> (backbone, routes or None)."""
    backbone, *routes = text.split(":")
    return backbone, [_route(r) for r in routes] or None


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; see `python -m routefx.bench --help`."""
    p = argparse.ArgumentParser(prog="python -m routefx.bench", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="DiT-B/2", help=f"one of: {', '.join(names())}")
    p.add_argument("--input-size", type=int, default=None, help="latent side (default: the backbone's)")
    p.add_argument("--routes", type=_route, action="append", default=None, metavar="S,E,R",
                   help="a route START,END,RATIO; repeatable (default: the paper rule 2,B-4,0.5)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 16 on cpu, 32 on cuda)")
    p.add_argument("--steps", type=int, default=7, help="timed rounds, median over them (use >= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compile happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each arm (same as --modes compiled)")
    p.add_argument("--run", type=_run_spec, action="append", default=None, metavar="BACKBONE[:S,E,R...]",
                   help="a backbone and its routes (default: the paper rule); repeatable, every run in "
                        "this one process; replaces --backbone/--routes")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="run every backbone in each mode, mode after mode (default: eager, or compiled "
                        "with --compile); regional compiles the blocks only, shared by the three arms")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 runs forward and loss under autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the result as JSON ('-': stdout); a list of results for several runs")
    p.add_argument("--json-dir", default=None, metavar="DIR",
                   help="also write each run's JSON to DIR/<backbone>_<routes>_<mode>.json as it ends")
    return p.parse_args(argv)


def default_routes(num_blocks: int) -> list:
    """The paper's rule: one route from block 2 to block B-4 at ratio 0.5 (clamped for tiny B).

    Example:
        >>> default_routes(12), default_routes(28)
        ([(2, 8, 0.5)], [(2, 24, 0.5)])
    """
    start = min(2, num_blocks - 1)
    return [(start, max(start, num_blocks - 4), 0.5)]


#################################################################################
#                                 Model set-up                                  #
#################################################################################

def _create(name: str, input_size, device) -> nn.Module:
    """The backbone, built and initialised on `device` (DiT-XL/2's init takes seconds on a CPU)."""
    key = "img_size" if name.startswith("U-ViT") else "input_size"
    kwargs = {} if input_size is None else {key: input_size}
    with torch.device(device):
        try:
            return create(name, **kwargs).to(device)
        except TypeError as e:
            if input_size is None:
                raise
            raise SystemExit(f"{name} does not take an input size ({e}); leave --input-size out.") from e


def _chain(model, inputs) -> tuple:
    """(block names, tokens N, prefix, hidden size) as routefx sees them, from a ratio-0 capture."""
    rg = routefx.router(routefx.apply(model, [(0, 0, 0.0)], example_inputs=inputs))._graphs[0][1]
    routefx.remove(model)
    dim = rg.streams.primary.meta["routefx"]["spec"].shape[-1]  # the token stream at block 0
    return list(rg.chain.names), rg.streams.num_tokens, rg.streams.protect, dim


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _amp(device, dtype):
    if dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _kept_ids(batch: int, n: int, ratio: float, device) -> torch.Tensor:
    n_keep = n - int(n * ratio)
    return torch.rand(batch, n, device=device).argsort(dim=1)[:, :n_keep].sort(dim=1).values


class HandTread(nn.Module):
    """TREAD (TREAD.md section 1) written by hand over a DiT/SiT; shares the model's parameters."""

    def __init__(self, model: DiT, routes: list):
        super().__init__()
        self.model = model
        self.starts = {r.start: r.ratio for r in routes}
        self.ends = {r.end for r in routes}

    def forward(self, x, t, y):
        m = self.model
        h = m.x_embedder(x) + m.pos_embed  # (N, T, D)
        c = m.t_embedder(t) + m.y_embedder(y, m.training)  # (N, D)
        saved = index = None
        for i, block in enumerate(m.blocks):
            if i in self.starts:
                ids = _kept_ids(h.shape[0], h.shape[1], self.starts[i], h.device)  # (N, T_keep)
                saved, index = h, ids[..., None].expand(-1, -1, h.shape[-1])
                h = h.gather(1, index)  # (N, T_keep, D)
            h = block(h, c)
            if i in self.ends:
                h = saved.scatter(1, index, h)  # (N, T, D), out of place
        return m.unpatchify(m.final_layer(h, c))  # (N, C, H, W)


class Dense(nn.Module):
    """The dense arm: the routed model's own forward, in training mode too (routefx routes in
    place, so the dense and routed arms share one model object)."""

    def __init__(self, routed):
        super().__init__()
        self.model = routed

    def forward(self, *args, **kwargs):
        return routefx.router(self.model).plain_forward(*args, **kwargs)


def _arms(model, routed, routes, mode: str = "eager", blocks=()) -> dict:
    """name -> callable for each arm; `hand` is None off the DiT family.

    `compiled` wraps each arm in `torch.compile`; `regional` compiles the modules named in `blocks`
    in place, which every arm then calls (the arms stay uncompiled around them).
    """
    eager = {"dense": Dense(routed), "routefx": routed,
             "hand": HandTread(model, routes) if isinstance(model, DiT) else None}
    if mode == "eager":
        return eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 512)
    if mode == "regional":
        for name in blocks:
            model.get_submodule(name).compile(dynamic=False)  # static graphs: per token count and layout
        return eager
    return {k: None if m is None else torch.compile(m) for k, m in eager.items()}


#################################################################################
#                                   Measuring                                   #
#################################################################################

def _step(arm, opt, inputs, target, amp):
    opt.zero_grad(set_to_none=True)
    with amp:
        out = arm(*inputs)
    F.mse_loss(out.float(), target).backward()
    opt.step()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_rounds(arms: dict, fn, rounds: int, device) -> dict:
    """Milliseconds per call of `fn(arm)` for every arm, interleaved A B C A B C ... `rounds` times."""
    times = {k: [] for k, a in arms.items() if a is not None}
    for _ in range(rounds):
        for k in times:
            times[k].append(_timed(lambda: fn(arms[k]), device))
    return times


def arm_flops(arm, inputs, amp):
    """`FlopCount` of one forward + backward of `arm` (`routefx.flops.count_flops`; gradients discarded)."""
    def step():
        with amp:
            out = arm(*inputs)
        out.float().square().mean().backward()
    counted = count_flops(step)
    for p in arm.parameters():
        p.grad = None
    return counted


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
        return True
    except OSError:
        return False


def _cpu_peak(fn) -> tuple:
    """Peak RSS growth during `fn()` in bytes: Linux VmHWM reset, else process-wide ru_maxrss."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reuse is not free
    if not _reset_hwm():
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, \
            "cpu: ru_maxrss, process-wide high-water mark (not per arm)"
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024, "cpu: peak RSS growth over the step (VmHWM reset per arm)"


def peak_memory(fn, device) -> tuple:
    """(bytes, method) of one call of `fn()`: CUDA max_memory_allocated, CPU see `_cpu_peak`."""
    if torch.device(device).type != "cuda":
        return _cpu_peak(fn)
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device), "cuda: torch.cuda.max_memory_allocated, reset per arm"


def _time_apply(model, routes, inputs, device) -> tuple:
    _sync(device)
    t0 = time.perf_counter()
    routed = routefx.apply(model, routes, example_inputs=inputs)
    _sync(device)
    return routed, time.perf_counter() - t0


def _eval_forward(model, routed, inputs, amp, rounds, device, mode) -> dict:
    routed.eval()  # the original module's mode follows
    with torch.no_grad(), amp:
        times = time_rounds({"dense": Dense(routed), "routefx": routed}, lambda a: a(*inputs), rounds + 1, device)
    routed.train()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"compiled": mode == "regional", "dense_ms": med["dense"], "routefx_ms": med["routefx"],
            "ratio": med["routefx"] / med["dense"]}


#################################################################################
#                                    Report                                     #
#################################################################################

def _arm_summary(times: list, warmup: int) -> dict:
    timed = times[warmup:]
    return {"median_ms": statistics.median(timed), "min_ms": min(timed), "times_ms": timed,
            "warmup_ms": times[:warmup]}


def _ratios(arms: dict) -> dict:
    d, r, h = (arms.get(k) for k in ARMS)
    flop_ratio = r["flops"] / d["flops"]
    out = {"routefx_over_dense": r["median_ms"] / d["median_ms"], "flop_ratio": flop_ratio,
           "efficiency": (d["median_ms"] / r["median_ms"]) / (d["flops"] / r["flops"]),
           "hand_over_dense": None, "routefx_over_hand": None, "hand_efficiency": None}
    if h is not None:
        out["hand_over_dense"] = h["median_ms"] / d["median_ms"]
        out["routefx_over_hand"] = r["median_ms"] / h["median_ms"]
        out["hand_efficiency"] = (d["median_ms"] / h["median_ms"]) / (d["flops"] / h["flops"])
    return out


def flop_ratio_estimate(num_blocks: int, routes: list, num_tokens: int, dim: int, protect: int = 0) -> float:
    """TREAD.md section 6 with attention (`routefx.flops.tread_flop_ratio`): blocks only."""
    return tread_flop_ratio(num_blocks, routes, num_tokens, dim, protect)


def linear_flop_ratio(num_blocks: int, routes: list) -> float:
    """TREAD.md section 6's rule of thumb, linear layers only: `(B - sum L * ratio) / B`."""
    return (num_blocks - sum((r.end - r.start + 1) * r.ratio for r in routes)) / num_blocks


def _env(device) -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    if dev.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return {"torch": torch.__version__, "python": platform.python_version(), "device_name": name,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _fmt(v, spec=".2f", suffix="x") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def format_table(res: dict) -> str:
    """The human-readable report of a `run` result."""
    c, r, arms = res["config"], res["ratios"], res["arms"]
    lines = [f"routefx bench: {c['backbone']} input {c['input_size']} ({res['tokens']} tokens, "
             f"{res['blocks']} blocks) batch {c['batch']} routes {c['routes']}",
             f"  {res['env']['device_name']} ({c['device']}), {c['mode']}, {c['optimizer']}, "
             f"{c['dtype']}, {res['env']['threads']} threads, torch {res['env']['torch']}",
             f"{'arm':<14}{'median ms':>11}{'min ms':>10}{'vs dense':>10}{'GFLOP':>10}{'peak MB':>10}"]
    for k in ARMS:
        a = arms[k]
        if a is None:
            lines.append(f"{k:<14}{'(not a DiT/SiT backbone)':>40}")
            continue
        lines.append(f"{k:<14}{a['median_ms']:>11.1f}{a['min_ms']:>10.1f}"
                     f"{a['median_ms'] / arms['dense']['median_ms']:>9.3f}x{a['flops'] / 1e9:>10.1f}"
                     f"{a['peak_mem_bytes'] / 2**20:>10.0f}")
    lines += [f"routefx/hand-written {_fmt(r['routefx_over_hand'], '.3f')}   FLOP ratio routed/dense "
              f"{r['flop_ratio']:.3f} (section-6 estimate {res['flop_ratio_estimate']:.3f} with attention, "
              f"{res['flop_ratio_estimate_linear']:.3f} linear layers only)",
              f"FLOPs: model FLOPs, attention included (routefx.flops); "
              f"{uncounted_line(arms['dense']['flops_uncounted'])}",
              f"efficiency (time speedup / FLOP speedup): routefx {r['efficiency']:.3f}, "
              f"hand {_fmt(r['hand_efficiency'], '.3f', '')}",
              f"apply(): {res['apply_s']:.2f} s   eval forward: dense {res['eval']['dense_ms']:.1f} ms, "
              f"routefx {res['eval']['routefx_ms']:.1f} ms, ratio {res['eval']['ratio']:.3f}",
              f"memory: {res['memory_method']}"]
    if c["mode"] != "eager":
        lines.append(f"graphs compiled for the training steps: {res['compiled_graphs']}")
    return "\n".join(lines)


#################################################################################
#                                    Driver                                     #
#################################################################################

def _setup(args) -> tuple:
    torch.manual_seed(args.seed)
    model = _create(args.backbone, args.input_size, args.device).train()
    batch = args.batch or (32 if torch.device(args.device).type == "cuda" else 16)
    inputs = example_inputs(model, batch)
    blocks, tokens, protect, dim = _chain(model, inputs)
    routes = resolve_routes(args.routes or default_routes(len(blocks)), len(blocks))
    estimate = {"flop_ratio_estimate": flop_ratio_estimate(len(blocks), routes, tokens, dim, protect),
                "flop_ratio_estimate_linear": linear_flop_ratio(len(blocks), routes)}
    return model, batch, inputs, blocks, tokens, routes, estimate


def _fused(device) -> bool:
    """Fused AdamW (one kernel for the whole update) where it exists: on CUDA."""
    return torch.device(device).type == "cuda"


def _measure_arms(arms, eager, model, inputs, args) -> dict:
    amp = _amp(args.device, args.dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=_fused(args.device) or None)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # no inference graph compiled for it
        target = torch.randn_like(model(*inputs).float())
    step = lambda arm: _step(arm, opt, inputs, target, amp)  # noqa: E731
    times = time_rounds(arms, step, args.warmup + args.steps, args.device)
    out, method = {k: None for k in ARMS}, None
    for k in times:
        out[k] = _arm_summary(times[k], args.warmup)
        out[k]["peak_mem_bytes"], method = peak_memory(lambda: step(arms[k]), args.device)
        counted = arm_flops(eager[k], inputs, amp)
        out[k]["flops"], out[k]["flops_uncounted"] = counted.total, counted.uncounted
    return out, method


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark for parsed `args`; returns the result dict (see `main`)."""
    env = _env(args.device)  # load average before the run
    model, batch, inputs, blocks, tokens, routes, estimate = _setup(args)
    routed, apply_s = _time_apply(model, routes, inputs, args.device)
    eager = _arms(model, routed, routes)
    arms = _arms(model, routed, routes, args.mode, blocks)
    graphs = counters["stats"]["unique_graphs"]
    measured, method = _measure_arms(arms, eager, model, inputs, args)
    config = {k: getattr(args, k) for k in ("backbone", "input_size", "steps", "warmup", "device",
                                            "compile", "mode", "dtype", "threads", "seed")}
    config.update(batch=batch, routes=[[r.start, r.end, r.ratio] for r in routes],
                  optimizer="AdamW, fused" if _fused(args.device) else "AdamW")
    return {"config": config, "env": env, "blocks": len(blocks), "tokens": tokens,
            "arms": measured, "ratios": _ratios(measured), "apply_s": apply_s,
            **estimate,
            "compiled_graphs": counters["stats"]["unique_graphs"] - graphs,
            "eval": _eval_forward(model, routed, inputs, _amp(args.device, args.dtype), args.steps,
                                  args.device, args.mode),
            "memory_method": method}


def _runs(args) -> list:
    """One Namespace per run: every `--run` (else `--backbone`/`--routes`) in every mode, mode after mode."""
    specs = args.run or [(args.backbone, args.routes)]
    modes = args.modes or (["compiled"] if args.compile else ["eager"])
    return [argparse.Namespace(**{**vars(args), "backbone": b, "routes": r, "mode": m, "compile": m != "eager"})
            for m in modes for b, r in specs]


def _json_name(res: dict) -> str:
    c = res["config"]
    routes = "+".join("-".join(f"{v:g}" for v in r) for r in c["routes"])
    name = c["backbone"].replace("/", "").lower()
    return f"{name}_{routes}_{c['mode']}.json"


def _write_json(obj, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def main(argv=None):
    """Benchmark dense vs routefx vs hand-written TREAD training steps and print a report.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`); see `--help`.
    Returns:
        The result dict (a list of them for several runs): `config`, `env`, `blocks`, `tokens`, `arms`
        (per arm: `median_ms`, `min_ms`, `times_ms`, `warmup_ms`, `peak_mem_bytes`, `flops`,
        `flops_uncounted`; `hand` is None off the DiT family), `ratios`, `flop_ratio_estimate` (TREAD.md
        section 6 with attention), `flop_ratio_estimate_linear` (linear layers only), `apply_s`,
        `compiled_graphs` (dynamo's unique graphs for the timed steps), `eval`, `memory_method`.

    Example:
        >>> res = main(["--backbone", "DiT-T/2", "--input-size", "8", "--batch", "2",
        ...             "--steps", "1", "--warmup", "0"])   # doctest: +SKIP
        >>> res["ratios"]["routefx_over_dense"] > 0          # doctest: +SKIP
        True
    """
    args = parse_args(argv)
    threads, results = torch.get_num_threads(), []
    try:
        torch.set_num_threads(args.threads or threads)
        for one in _runs(args):
            res = run(one)
            results.append(res)
            print(format_table(res), file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
            if args.json_dir:
                _write_json(res, os.path.join(args.json_dir, _json_name(res)))
            if one.compile:
                torch._dynamo.reset()  # frees this run's compiled arms (and the memory they hold)
            gc.collect()  # so that the next run's peak memory starts from zero
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
    out = results[0] if len(results) == 1 else results
    if args.json == "-":
        print(json.dumps(out, indent=2))
    elif args.json:
        _write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
