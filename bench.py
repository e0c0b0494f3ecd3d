# Benchmarks — needs common.py and simclr.py beside it
"""Timings behind the README's performance numbers; every number there comes from a command here.

Usage:
    python bench.py ortho --arch resnet18 --batch-size 256     # share of --ortho so/srip in a training step
Prints a table and writes bench_ortho.json (or --out).
"""
import argparse
import json
import platform
import time

import torch
import torch.nn as nn

from common import OrthogonalityRegularizer, autocast, build_backbone, build_optimizer, optimizer_step, \
    positive_int, projection_mlp, resolve_device
from simclr import nt_xent_loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("ortho",), help="which benchmark")
    parser.add_argument("--arch", default="resnet18", help="backbone (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per step, two views each (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=32, help="crop size (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per setting, after 2 warm-up steps (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    parser.add_argument("--out", default="bench_ortho.json", help="JSON output path (default: %(default)s)")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    return args


def timed(fn, steps, device):
    """Median seconds of fn() over `steps` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_ortho(args):
    """A SimCLR training step (two views, backbone + projector, LARS) on ready tensors, with and
    without each penalty, and the penalty's forward + backward alone."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(args.arch, args.image_size)
    model = nn.ModuleDict({"backbone": backbone, "projector": projection_mlp([feature_dim, 2048, 128], batch_norm=False)}).to(device)
    optimizer = build_optimizer("lars", model, 0.1, 1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    x1, x2 = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device) for _ in range(2))
    results = {"arch": args.arch, "batch_size": args.batch_size, "device": str(device), "precision": args.precision,
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    for kind, weight in (("none", 0.0), ("so", 1e-6), ("srip", 1e-3)):
        regulariser = OrthogonalityRegularizer(model, kind).to(device)

        def step():
            with autocast(device, args.precision):
                z1, z2 = model["projector"](model["backbone"](x1)), model["projector"](model["backbone"](x2))
            loss = nt_xent_loss(z1.float(), z2.float(), 0.2) + weight * regulariser()
            optimizer_step(loss, optimizer, scaler)

        def penalty_alone():
            regulariser().backward()

        results[f"step_s_{kind}"] = timed(step, args.steps, device)
        if kind != "none":
            results[f"penalty_s_{kind}"] = timed(penalty_alone, args.steps, device)
            results[f"share_{kind}"] = results[f"penalty_s_{kind}"] / results[f"step_s_{kind}"]
        results["layers"] = len(regulariser.layers)
    return results


def main(args):
    results = bench_ortho(args)
    print(f"{results['arch']} batch {results['batch_size']} on {results['gpu'] or results['cpu']} "
          f"({results['threads']} threads), {results['precision']}, {results['layers']} regularised layers")
    print("| --ortho | step (s) | penalty fwd+bwd alone (s) | penalty share of the step |")
    print("|---|---|---|---|")
    for kind in ("none", "so", "srip"):
        alone = results.get(f"penalty_s_{kind}")
        share = results.get(f"share_{kind}")
        print(f"| {kind} | {results[f'step_s_{kind}']:.4f} | {'—' if alone is None else f'{alone:.4f}'} | "
              f"{'—' if share is None else f'{100 * share:.1f}%'} |")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(parse_args())
