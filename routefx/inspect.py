"""`python -m routefx.inspect model.py`: what the pass sees, and what a route costs and saves.

The model file defines `build_model()` (or pick a factory with `--factory NAME`, or the file
has exactly one `nn.Module` subclass constructible without arguments) and `example_inputs()`
(or `example_inputs(model)`; or give `--inputs x=2x4x32x32 t=2 y=2:long`).

Example:
    python -m routefx.inspect backbones/dit.py --factory DiT-B/2 --route 2,8,0.5
"""
import argparse
import importlib.util
import inspect as pyinspect
import json
import os
import sys
import traceback

import torch
from torch import nn

from .api import apply, remove, router
from .errors import RouteError
from .flops import count_flops, tread_flop_ratio, uncounted_line
from .route import Route, paper_route

__all__ = ["inspect_model", "format_report", "load_model_file", "parse_inputs", "main"]


# -- loading a user's model file ----------------------------------------------------------------

def load_model_file(path: str, factory: str = None):
    """Import `path` and build its model; returns `(module, model)`."""
    if not os.path.exists(path):
        raise RouteError(f"No such model file: {path}")
    spec = importlib.util.spec_from_file_location(f"routefx_user_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod, _build(mod, factory, path)


def _build(mod, factory, path):
    if factory:
        if callable(getattr(mod, factory, None)):
            return getattr(mod, factory)()
        for value in vars(mod).values():
            if isinstance(value, dict) and factory in value and callable(value[factory]):
                return value[factory]()
        if callable(getattr(mod, "build_model", None)):
            return mod.build_model(factory)
        raise RouteError(f"--factory {factory}: {path} has no function or model-dict entry of that name.")
    if callable(getattr(mod, "build_model", None)):
        return mod.build_model()
    classes = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, nn.Module)
               and c.__module__ == mod.__name__ and _no_arg_constructible(c)]
    if len(classes) > 1:  # keep the outermost: drop classes used inside another one's instance
        built = {c: c() for c in classes}
        inner = {type(m) for obj in built.values() for m in list(obj.modules())[1:]}
        roots = [obj for c, obj in built.items() if c not in inner]
        if len(roots) == 1:
            return roots[0]
    if len(classes) == 1:
        return classes[0]()
    raise RouteError(f"{path}: define build_model(), or pass --factory NAME (found no-argument nn.Module "
                     f"classes: {[c.__name__ for c in classes]}).")


def _no_arg_constructible(cls) -> bool:
    try:
        params = pyinspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in list(params)[1:])


def parse_inputs(specs: list) -> tuple:
    """`["x=2x4x32x32", "t=2", "y=2:long"]` -> kwargs of random tensors with those shapes."""
    kwargs = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        shape, _, dtype = rest.partition(":")
        dims = tuple(int(d) for d in shape.split("x") if d)
        dt = getattr(torch, dtype or "float32", None)
        if not name or not dims or not isinstance(dt, torch.dtype):
            raise RouteError(f"--inputs: cannot read {spec!r}; write NAME=2x4x32x32[:dtype], e.g. y=2:long")
        kwargs[name] = torch.randint(0, 10, dims, dtype=dt) if not dt.is_floating_point else torch.randn(dims, dtype=dt)
    return (), kwargs


def _example(mod, model, inputs):
    if inputs:
        return parse_inputs(inputs)
    fn = getattr(mod, "example_inputs", None)
    if fn is None:
        raise RouteError("The model file defines no example_inputs(); pass --inputs x=2x4x32x32 t=2 y=2:long")
    ex = fn(model) if pyinspect.signature(fn).parameters else fn()
    if isinstance(ex, dict):
        return (), ex
    return (tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)), {}


# -- the report ---------------------------------------------------------------------------------

def _step(model, args, kwargs):
    def run():
        out = model(*args, **kwargs)
        leaves = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        sum(o.float().square().mean() for o in leaves).backward()
    return run


def inspect_model(model: nn.Module, args: tuple, kwargs: dict, routes=None, check=False, **apply_kw) -> dict:
    """Capture `model`, find its chain, and cost `routes` (default: the paper's rule).

    Returns a JSON-able dict: capture, chain, tokens, per-block FLOPs, and per-route crossings,
    dense vs routed forward and fwd+bwd FLOPs (`routefx.flops.count_flops` on both models: model
    FLOPs, attention included), TREAD.md section 6's estimate of the ratio, and the ops with
    compute that no formula counted (`uncounted`, name -> calls).
    """
    model.train()
    rg0 = router(apply(model, [], example_inputs=(args, kwargs), **apply_kw))._graphs[0][1]
    remove(model)  # (routes in place: the model is left as it came)
    routes = list(routes) if routes else [paper_route(len(rg0.chain))]
    fwd, step = count_flops(lambda: model(*args, **kwargs)), count_flops(_step(model, args, kwargs))
    model.zero_grad(set_to_none=True)
    prefix, per_module = type(model).__name__ + ".", fwd.per_module
    dense = {"fwd_flops": fwd.total, "step_flops": step.total, "dim": _dim(rg0.streams)}
    report = {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "capture": {"leaf_blocks": len(rg0.chain), "seconds": round(rg0.seconds, 3),
                    "fixed_values": [{"where": w, "kind": k, "value": v} for _, k, v, w in rg0.guards]},
        "chain": [{"index": i, "module": n, "fwd_flops": sum(per_module.get(prefix + n, {}).values())}
                  for i, n in enumerate(rg0.chain.names)],
        "other_chains": rg0.chain.alternatives,
        "tokens": {"num_tokens": rg0.streams.num_tokens, "prefix": rg0.streams.protect,
                   "batch": rg0.streams.batch, "stream": rg0.streams.primary.name},
        "dense": dense,
        "routes": [_route_report(model, args, kwargs, r, dense, apply_kw) for r in routes],
    }
    report["uncounted"] = step.uncounted  # the routed steps run the same ops (on fewer tokens)
    if check:
        report["check"] = _check(model, args, kwargs, routes, apply_kw)
    return report


def _dim(streams):
    """Hidden size of the token stream at block 0, or None if the capture did not record it."""
    spec = streams.primary.meta.get("routefx", {}).get("spec")
    return spec.shape[-1] if getattr(spec, "shape", None) else None


def _route_report(model, args, kwargs, route, dense, apply_kw) -> dict:
    routed = apply(model, [route], example_inputs=(args, kwargs), **apply_kw)
    rg = router(routed)._graphs[0][1]
    plan = rg.plans[0]
    routed.train()
    fwd, step = count_flops(lambda: routed(*args, **kwargs)), count_flops(_step(routed, args, kwargs))
    model.zero_grad(set_to_none=True)
    remove(model)
    r = plan.route
    estimate = None if dense["dim"] is None else tread_flop_ratio(
        len(rg.chain), [r], plan.num_tokens, dense["dim"], protect=plan.protect)
    return {"route": [r.start, r.end, r.ratio], "blocks": plan.blocks, "num_tokens": plan.num_tokens,
            "protect": plan.protect, "kept_tokens": plan.num_kept, "shared_indices": plan.shared_indices,
            "gathered": plan.gathered, "scattered": plan.scattered, "passed": plan.passed,
            "fwd_flops": fwd.total, "step_flops": step.total, "fwd_ratio": fwd.total / dense["fwd_flops"],
            "step_ratio": step.total / dense["step_flops"], "estimated_ratio": estimate,
            "predicted_step_time_ratio": step.total / dense["step_flops"]}


def _check(model, args, kwargs, routes, apply_kw) -> dict:
    model.eval()
    with torch.no_grad():
        plain = model(*args, **kwargs)
    routed = apply(model, routes, example_inputs=(args, kwargs), **apply_kw)
    routed.train()
    _step(routed, args, kwargs)()
    grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    routed.eval()
    with torch.no_grad():
        same = _equal(routed(*args, **kwargs), plain)
    model.train()
    remove(model)
    return {"train_step_ok": True, "all_parameters_got_grad": grads, "eval_equals_original": same}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _g(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP" if x >= 1e8 else f"{x / 1e6:.2f} MFLOP"


def format_report(rep: dict) -> str:
    """Human-readable text of an `inspect_model` report."""
    lines = [f"{rep['model']}: {rep['parameters'] / 1e6:.1f}M parameters",
             f"capture: {rep['capture']['leaf_blocks']} blocks kept as leaves, {rep['capture']['seconds']}s"]
    for f in rep["capture"]["fixed_values"]:
        lines.append(f"  fixed at trace time (guarded at run time): {f['kind']}(...) = {f['value']!r} at {f['where']}")
    tok = rep["tokens"]
    lines.append(f"tokens: N={tok['num_tokens']} ({tok['prefix']} protected prefix), stream '{tok['stream']}'")
    lines.append(f"block chain ({len(rep['chain'])} blocks, longest of {1 + len(rep['other_chains'])} candidate chains):")
    lines += [f"  [{b['index']:>2}] {b['module']:<28} {_g(b['fwd_flops'])}" for b in rep["chain"]]
    for alt in rep["other_chains"][:3]:
        lines.append(f"  (also seen: {len(alt)} x {alt[0]}...)")
    lines.append(f"dense: forward {_g(rep['dense']['fwd_flops'])}, fwd+bwd {_g(rep['dense']['step_flops'])} "
                 f"(model FLOPs, attention included; routefx.flops)")
    lines.append(f"  {uncounted_line(rep['uncounted'])}")
    for r in rep["routes"]:
        s, e, ratio = r["route"]
        lines.append(f"route ({s}, {e}, {ratio}): blocks {r['blocks'][0]}..{r['blocks'][-1]} see "
                     f"{r['kept_tokens']} of {r['num_tokens']} tokens"
                     + (" (one index set for the whole batch: an unbatched per-token table enters)"
                        if r.get("shared_indices") else ""))
        lines += [f"  gathered  {g['tensor']} {tuple(g['shape'])} ({g['kind']}) -> {g['into']}" for g in r["gathered"]]
        lines += [f"  scattered {c['tensor']} -> into {c['base']} {tuple(c['shape'])}" for c in r["scattered"]]
        lines += [f"  untouched {p['tensor']} {tuple(p['shape'])}" for p in r["passed"]]
        est = "" if r["estimated_ratio"] is None else f" (TREAD.md section 6 estimate {r['estimated_ratio']:.3f})"
        lines.append(f"  FLOPs routed/dense: forward {r['fwd_ratio']:.3f}, fwd+bwd {r['step_ratio']:.3f}{est} "
                     f"-> predicted step time x{r['predicted_step_time_ratio']:.2f}")
    if "check" in rep:
        lines.append(f"check: {rep['check']}")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------

def _parse_route(text: str) -> Route:
    try:
        s, e, r = text.split(",")
        return Route(int(s), int(e), float(r))
    except ValueError as err:
        raise RouteError(f"--route {text!r}: write START,END,RATIO, e.g. --route 2,8,0.5") from err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m routefx.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("model_file")
    ap.add_argument("--factory", help="factory / registry name inside the file, e.g. DiT-B/2")
    ap.add_argument("--inputs", nargs="+", help="example inputs, e.g. x=2x4x32x32 t=2 y=2:long")
    ap.add_argument("--route", action="append", default=[], help="START,END,RATIO (repeatable)")
    ap.add_argument("--blocks", nargs="+", help="explicit block module names (or one container name)")
    ap.add_argument("--protect", type=int, help="prefix tokens never routed")
    ap.add_argument("--shared-indices", action="store_const", const=True, default=None,
                    help="one index set for the whole batch in every route (default: only where an "
                         "unbatched per-token table needs it)")
    ap.add_argument("--per-sample-indices", dest="shared_indices", action="store_const", const=False,
                    help="one index set per sample, refusing routes that cannot take it")
    ap.add_argument("--graph", help="write the block-level graph: out.svg, out.png or out.dot")
    ap.add_argument("--check", action="store_true", help="run a routed train step and an eval step")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    a = ap.parse_args(argv)
    try:
        torch.manual_seed(0)
        mod, model = load_model_file(a.model_file, a.factory)
        args, kwargs = _example(mod, model, a.inputs)
        kw = {"blocks": a.blocks[0] if a.blocks and len(a.blocks) == 1 else a.blocks, "protect": a.protect,
              "shared_indices": a.shared_indices}
        routes = [_parse_route(r) for r in a.route] or None
        rep = inspect_model(model, args, kwargs, routes, check=a.check, **kw)
        if a.graph:
            from .graph_picture import draw_routes
            rep["graph"] = draw_routes(model, args, kwargs, [Route(*r["route"]) for r in rep["routes"]], a.graph, **kw)
    except Exception as e:  # noqa: BLE001 - the CLI explains instead of dumping a traceback
        if a.debug:
            traceback.print_exc()
        print(f"routefx.inspect: {type(e).__name__}: {e}", file=sys.stderr)
        if not a.debug:
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1, default=str) if a.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
