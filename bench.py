# Benchmarks — needs common.py and the method files beside it
"""Timings behind the README's performance numbers; every number there comes from a command here.

Usage:
    python bench.py speed --dataset synthetic --synthetic-size 50000        # images/s of each method, CPU or GPU
    python bench.py speed --methods intl --arch resnet18 --batch-size 512 --precision bf16 --compile
    python bench.py speed --skip pil data flops --deterministic            # the cost of --deterministic
    python bench.py ortho --arch resnet18 --batch-size 256                  # share of --ortho so/srip in a step
speed measures, per method: (a) the tensor pipeline alone (uint8 batch -> two augmented views),
(b) the method's own training step (its main(), unchanged) on ready tensors, (c) end to end
(main() fed by the tensor pipeline), (d) torchvision's PIL pipeline with the same recipe in a
DataLoader with --num-workers workers. Prints a table and writes bench_speed.json (or --out).
"""
import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from unittest import mock

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import byol
import intl
import simclr
import vicreg
from common import Bounded, OrthogonalityRegularizer, atomic_write, autocast, build_backbone, build_data, \
    build_optimizer, optimizer_step, parse_or_die, positive_int, projection_mlp, resolve_device, resolve_precision, \
    seed_everything
from simclr import nt_xent_loss

METHODS = {"simclr": simclr, "byol": byol, "vicreg": vicreg, "intl": intl}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "ortho"), help="which benchmark")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS),
                        help="speed: methods to time (default: all)")
    parser.add_argument("--dataset", default="synthetic", help="speed: --dataset of the runs (default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="speed: --data-dir of the runs (default: %(default)s)")
    parser.add_argument("--synthetic-size", type=positive_int, default=10000,
                        help="speed: --dataset synthetic images; 50000 is a CIFAR-sized epoch (default: %(default)s)")
    parser.add_argument("--arch", default="resnet18", help="backbone (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="images per step, two views each (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=32, help="ortho: crop size (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="timed steps per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=Bounded(int, ge=0), default=2,
                        help="untimed steps first; --compile needs more (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast dtype (default: %(default)s = bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                        default=None, metavar="MODE", help="speed: torch.compile the backbones, as the method flag")
    parser.add_argument("--overlap", action="store_true",
                        help="speed: augment the next batch while the step runs, as the method flag")
    parser.add_argument("--deterministic", action="store_true",
                        help="speed: deterministic kernels only, as the method flag (its cost)")
    parser.add_argument("--num-workers", type=Bounded(int, ge=0), default=min(8, torch.get_num_threads()),
                        help="speed: DataLoader workers of the PIL pipeline (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="speed: the device's peak TFLOP/s at --precision, for the share-of-peak column")
    parser.add_argument("--profile", action="store_true", help="speed: print where a step's time goes (torch.profiler)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("data", "step", "end_to_end", "pil", "flops"),
                        help="speed: measurements to leave out")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench_<what>.json)")
    args = parse_or_die(parser, argv)
    args.device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, args.device)
    args.out = args.out or f"bench_{args.what}.json"
    return args


def hardware(device):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return {"device": str(device), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(), "commit": commit or None,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


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
    projector = projection_mlp([feature_dim, 2048, 128], batch_norm=False)
    model = nn.ModuleDict({"backbone": backbone, "projector": projector}).to(device)
    optimizer = build_optimizer("lars", model, 0.1, 1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    x1, x2 = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device) for _ in range(2))
    results = {**hardware(device), "arch": args.arch, "batch_size": args.batch_size, "precision": args.precision}
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimedLoader:
    """Wraps a training loader for a method's main(): yields `warmup + steps` batches and records
    the time between consecutive batches, i.e. one training step plus fetching the next batch
    (after a device sync, so queued GPU work is counted). ready=True repeats one prepared batch,
    which leaves the data pipeline out."""

    def __init__(self, loader, warmup, steps, device, ready=False):
        self.loader, self.warmup, self.steps, self.device, self.ready = loader, warmup, steps, device, ready
        self.generator = loader.generator
        self.times = []

    def __len__(self):
        return self.warmup + self.steps

    def __iter__(self):
        batches = endless(self.loader)
        fixed = next(batches) if self.ready else None
        for _ in range(len(self)):
            batch = fixed if self.ready else next(batches)
            sync(self.device)
            self.times.append(time.perf_counter())
            yield batch
        sync(self.device)
        self.times.append(time.perf_counter())

    def seconds_per_step(self):
        return (self.times[-1] - self.times[self.warmup]) / self.steps


def method_args(module, args, run_dir, pipeline):
    # the reference recipe's optimiser on any dataset (BYOL's offline check has its own: SGD)
    reference = module.parse_args(["--dataset", "cifar10", "--device", "cpu"])
    margs = module.parse_args(
        ["--optimizer", reference.optimizer, "--base-lr", str(reference.base_lr), "--weight-decay",
         str(reference.weight_decay), "--dataset", args.dataset, "--data-dir", args.data_dir, "--synthetic-size",
         str(args.synthetic_size), "--arch", args.arch, "--batch-size", str(args.batch_size), "--epochs", "1",
         "--precision", args.precision, "--device", args.device, "--num-workers", str(args.num_workers), "--pipeline",
         pipeline, "--log-every", "1000000", "--out-dir", run_dir, "--run-name", f"{module.METHOD}-{pipeline}"]
        + (["--compile", args.compile] if args.compile else []) + (["--overlap"] if args.overlap else [])
        + (["--deterministic"] if args.deterministic else []))
    margs.blur_p = reference.blur_p  # the recipe's blur, also on the synthetic set (whose offline check has none)
    return margs


def time_main(module, margs, data, warmup, steps, ready):
    """Run the method's main() on `data` for warmup + steps steps; returns seconds per step."""
    timed_loader = TimedLoader(data.train_loader, warmup, steps, torch.device(margs.device), ready=ready)
    fake = data._replace(train_loader=timed_loader)
    fresh_folder = lambda args, is_main: tempfile.mkdtemp(dir=args.out_dir)  # noqa: E731  one per timed run
    with mock.patch.object(module, "build_data", lambda *_: fake), \
            mock.patch.object(module, "claim_run_folder", fresh_folder), \
            mock.patch.object(module, "evaluate", lambda *a, **k: {}), \
            mock.patch.object(module.Run, "end_of_epoch", lambda *a, **k: None):
        module.main(margs)
    return timed_loader.seconds_per_step()


def endless(loader):
    while True:
        yield from loader


def time_loader(loader, warmup, steps, device):
    """Seconds per batch of iterating a loader (its images made on the device), over epochs."""
    batches = endless(loader)
    for _ in range(warmup):
        next(batches)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        (x1, x2), _ = next(batches)
    sync(device)
    return (time.perf_counter() - start) / steps


def step_flops(module, margs, data):
    """Floating-point operations of one training step of the method's main() (forward, backward and
    optimiser, as torch's FlopCounterMode counts them: matmuls and convolutions, 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        time_main(module, margs, data, 0, 1, ready=True)
    return counter.get_total_flops()


def profile_summary(module, margs, data, steps, device, rows=8):
    """The ops that take most of a step's time over `steps` ready-batch steps, from torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        time_main(module, margs, data, 0, steps, ready=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows)


def bench_speed(args):
    device = torch.device(args.device)
    seed_everything(0, args.deterministic)  # before any GPU work, which reads the cuBLAS workspace setting
    results = {**hardware(device), "arch": args.arch, "batch_size": args.batch_size, "precision": args.precision,
               "compile": args.compile, "overlap": args.overlap, "deterministic": args.deterministic,
               "dataset": args.dataset, "num_workers": args.num_workers, "methods": {}}
    for name in args.methods:
        module, row = METHODS[name], {}
        with tempfile.TemporaryDirectory() as run_dir:
            margs = method_args(module, args, run_dir, "tensor")
            data = build_data(margs)
            row["augmentations"] = margs.augmentations
            images_per_s = lambda seconds: args.batch_size / seconds  # noqa: E731
            if "data" not in args.skip:
                row["data"] = images_per_s(time_loader(data.train_loader, args.warmup, args.steps, device))
            if "step" not in args.skip:
                row["step"] = images_per_s(time_main(module, margs, data, args.warmup, args.steps, ready=True))
            if "end_to_end" not in args.skip:  # the same data: main() reseeds its loader every epoch
                row["end_to_end"] = images_per_s(time_main(module, margs, data, args.warmup, args.steps, ready=False))
            if "pil" not in args.skip:  # past the batches the workers prefetch while starting
                pil_args = method_args(module, args, run_dir, "pil")
                warmup = max(args.warmup, 4 * max(1, args.num_workers))
                row["pil"] = images_per_s(time_loader(build_data(pil_args).train_loader, warmup, args.steps, device))
            if "flops" not in args.skip:  # achieved TFLOP/s from the end-to-end (else the step's) rate
                row["tflop_per_step"] = step_flops(module, margs, data) / 1e12
                rate = row.get("end_to_end", row.get("step"))
                if rate:
                    row["tflops"] = row["tflop_per_step"] * rate / args.batch_size
                    if args.peak_tflops:
                        row["share_of_peak"] = row["tflops"] / args.peak_tflops
            if args.profile:
                row["profile"] = profile_summary(module, margs, data, args.steps, device)
            if device.type == "cpu" and "data" in row and "pil" in row:  # the target: tensor >= 3x PIL per core
                row["data_per_core"] = row["data"] / torch.get_num_threads()
                row["pil_per_core"] = row["pil"] / max(1, args.num_workers)
        results["methods"][name] = row
        write_json(results, args.out)  # after every method: a run stopped by a time limit keeps what it measured
    return results


def print_speed(results):
    where = results["gpu"] or f"{results['cpu']} CPU, {results['threads']} threads"
    compiled = f", --compile {results['compile']}" if results["compile"] else ""
    compiled += ", --overlap" if results.get("overlap") else ""
    compiled += ", --deterministic" if results.get("deterministic") else ""
    print(f"{results['arch']}, batch {results['batch_size']}, {results['precision']}{compiled}, {results['dataset']}, "
          f"on {where} (commit {results['commit']})")
    print(f"images/s (each image two views); PIL pipeline with {results['num_workers']} DataLoader workers")
    print("| method | recipe | (a) tensor pipeline | (b) training step | (c) end to end | (d) PIL pipeline | "
          "epoch of 50k images, end to end | TFLOP per step | TFLOP/s | share of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results["methods"].items():
        cell = lambda key, form="{:,.0f}": form.format(row[key]) if key in row else "—"  # noqa: E731
        epoch = f"{50000 / row['end_to_end']:.1f} s" if "end_to_end" in row else "—"
        print(f"| {name} | {row['augmentations']} | {cell('data')} | {cell('step')} | {cell('end_to_end')} | "
              f"{cell('pil')} | {epoch} | {cell('tflop_per_step', '{:.3f}')} | {cell('tflops', '{:.2f}')} | "
              f"{cell('share_of_peak', '{:.0%}')} |")
    for name, row in results["methods"].items():
        if "profile" in row:
            print(f"\nwhere a step of {name} spends its time (torch.profiler, self time):\n{row['profile']}")
    per_core = {name: row for name, row in results["methods"].items() if "data_per_core" in row}
    if per_core:
        ratios = [f"{name} {row['data_per_core']:,.0f} vs {row['pil_per_core']:,.0f} = "
                  f"{row['data_per_core'] / row['pil_per_core']:.1f}x" for name, row in per_core.items()]
        print("per CPU core (tensor pipeline / torch threads, PIL / workers): " + "; ".join(ratios))


def print_ortho(results):
    print(f"{results['arch']} batch {results['batch_size']} on {results['gpu'] or results['cpu']} "
          f"({results['threads']} threads), {results['precision']}, {results['layers']} regularised layers")
    print("| --ortho | step (s) | penalty fwd+bwd alone (s) | penalty share of the step |")
    print("|---|---|---|---|")
    for kind in ("none", "so", "srip"):
        alone = results.get(f"penalty_s_{kind}")
        share = results.get(f"share_{kind}")
        print(f"| {kind} | {results[f'step_s_{kind}']:.4f} | {'—' if alone is None else f'{alone:.4f}'} | "
              f"{'—' if share is None else f'{100 * share:.1f}%'} |")


def write_json(results, path):
    atomic_write(path, "w", lambda f: json.dump(results, f, indent=2))


def main(args):
    results = bench_speed(args) if args.what == "speed" else bench_ortho(args)
    (print_speed if args.what == "speed" else print_ortho)(results)
    write_json(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(parse_args())
