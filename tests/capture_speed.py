"""Capture time of the diffusers test configs: `python tests/capture_speed.py [--cases ...]`.

Prints, per class and case, the seconds `routefx.apply(model, [(1, -2, 0.5)])` spends capturing
on the first training call (RoutedGraph.seconds: trace, chain, probe, route insertion and the
verification forward, all on fake tensors), and the time of the second call for scale. A
benchmark, not a test: these machines are noisy, run it on an idle one.
"""
import argparse
import statistics
import sys
import time
import warnings

import torch

import routefx
import diffusers_zoo as Z


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["text8"], choices=Z.CASES)
    p.add_argument("--names", nargs="+", default=Z.TEN + Z.MORE)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, a, k = Z.build("DiTTransformer2DModel", "text8")  # imports and first-use costs, untimed
    routefx.apply(model, [(1, -2, 0.5)])(*a, **k)
    times = []
    print(f"{'class':40s} {'case':18s} capture  2nd call")
    for name in args.names:
        for case in args.cases:
            if (name, case) in Z.SKIP:
                continue
            model, a, k = Z.build(name, case)
            routed = routefx.apply(model, [(1, -2, 0.5)])
            torch.manual_seed(0)
            routed(*a, **k)
            t = time.perf_counter()
            routed(*a, **k)
            second = time.perf_counter() - t
            s = routefx.router(routed)._graphs[0][1].seconds
            times.append(s)
            print(f"{name:40s} {case:18s} {s:6.2f}s  {second * 1e3:6.1f}ms")
    print(f"median {statistics.median(times):.2f}s, max {max(times):.2f}s over {len(times)} captures")


if __name__ == "__main__":
    sys.exit(main())
