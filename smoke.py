# Smoke test of every GPU path — needs the method files and common.py beside it
"""A few steps and an evaluation of every path a GPU run can take, each as a user runs it (a subprocess under its
own time limit, so one failure stops nothing else), several at once: the first minutes of a GPU window
(gpu_check.sh), so that a bug in one path does not spend the whole window.

Usage:
    python smoke.py --out smoke                                        # one GPU: about 2 minutes (not measured)
    python smoke.py --out smoke --device cpu --arch convnet --skip compile --parallel 2   # the CPU form
Paths, on a generated 10-class image folder (--images images, batch --batch-size, 1 epoch, a line every step):
METHOD/PIPELINE/PRECISION/MODE for every method, with
    tensor and pil pipelines x plain, overlap (--overlap) and compile (--compile reduce-overhead), in bf16;
    pil x overlap is skipped: --overlap applies to the tensor pipeline only;
    tensor/fp32/plain and tensor/fp16/plain (fp16, with its gradient scaler, only on a GPU);
    tensor/bf16/resume-deterministic: 2 epochs with --deterministic, SIGTERM in epoch 2, --resume: the weights
    must equal an uninterrupted run's bit for bit; tensor/bf16/resume: the same without --deterministic, the
    largest weight difference reported (not asserted).
Compile paths start first (compiling is slowest), then the resumes. Writes OUT/smoke.txt, one line per path:
`ok PATH SECONDS s`, `failed PATH: ITS LAST ERROR LINE` or `skipped PATH: why`; each path's output in OUT/logs/,
and the end of each failed path's log in OUT/smoke_failures.txt.
torchrun on GPUs (NCCL) needs two GPUs: not a path here.
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image

from common import Bounded, atomic_write, parse_or_die, positive_int, resolve_device

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("simclr", "byol", "vicreg", "intl")
MODES = {"plain": [], "overlap": ["--overlap"], "compile": ["--compile", "reduce-overhead"]}
PARTS = METHODS + ("tensor", "pil", "bf16", "fp32", "fp16", *MODES, "resume", "resume-deterministic")
STARTS_WITHIN = 10  # seconds of the budget a path needs left to be started


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="smoke", help="output folder, a new one (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the methods whose paths run (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out the paths with any of these parts, e.g. "
                        "compile fp16 pil resume")
    parser.add_argument("--device", default="auto", help="--device of the runs (default: %(default)s)")
    parser.add_argument("--arch", default="resnet18", help="--arch of the runs (default: %(default)s)")
    parser.add_argument("--images", type=Bounded(int, ge=20), default=320,
                        help="training images of the generated folder, and a fifth as many test images "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=Bounded(int, ge=2), default=64,
                        help="--batch-size of the runs (default: %(default)s)")
    parser.add_argument("--num-workers", type=Bounded(int, ge=0), default=2,
                        help="DataLoader workers of the pil paths (default: %(default)s)")
    parser.add_argument("--parallel", type=positive_int, default=16,
                        help="paths at once: the 8 compile paths and 8 others on one GPU (default: %(default)s)")
    parser.add_argument("--timeout", type=positive_int, default=100, help="seconds per path (default: %(default)s)")
    parser.add_argument("--budget", type=positive_int, default=120,
                        help="seconds for all paths: none starts after it, none runs past it (default: %(default)s)")
    args = parse_or_die(parser, argv)
    args.device = resolve_device(args.device)
    if args.images // args.batch_size < 2:
        parser.error(f"--images {args.images} makes fewer than 2 steps of --batch-size {args.batch_size}")
    if set(args.skip) - set(PARTS):
        unknown = " ".join(sorted(set(args.skip) - set(PARTS)))
        parser.error(f"--skip {unknown}: not a part of a path ({', '.join(PARTS)})")
    if os.path.exists(os.path.join(args.out, "smoke.txt")):
        parser.error(f"{args.out}/smoke.txt exists: pass another --out (nothing is overwritten)")
    return args


def all_paths(methods):
    """Every path of the methods, METHOD/PIPELINE/PRECISION/MODE, in the summary's order."""
    return [path for method in methods for path in
            [f"{method}/{pipeline}/bf16/{mode}" for pipeline in ("tensor", "pil") for mode in MODES] +
            [f"{method}/tensor/fp32/plain", f"{method}/tensor/fp16/plain", f"{method}/tensor/bf16/resume-deterministic",
             f"{method}/tensor/bf16/resume"]]


def smoke_paths(methods, skip=(), device="cuda"):
    """(the paths to run, compile paths first, {skipped path: why})."""
    paths, skipped = all_paths(methods), {}
    for path in paths:
        parts = path.split("/")
        if parts[1:4:2] == ["pil", "overlap"]:
            skipped[path] = "--overlap applies to the tensor pipeline only"
        elif parts[2] == "fp16" and not device.startswith("cuda"):
            skipped[path] = "--precision fp16 needs a GPU"
        elif set(parts) & set(skip) or any(parts[3].startswith(word) for word in skip):
            skipped[path] = f"left out by --skip {' '.join(skip)}"
    order = {"compile": 0, "resume-deterministic": 1, "resume": 1}  # the slowest first
    return sorted((p for p in paths if p not in skipped), key=lambda p: order.get(p.split("/")[3], 2)), skipped


def write_image_folder(root, images, size=32, classes=10, seed=0):
    """root/{train,test}/classK/*.png: noise around a colour of each class, `images` training images, a fifth as many
    test images."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(64, 192, (classes, 3))
    for split, count in (("train", images), ("test", images // 5)):
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % classes}")
            os.makedirs(folder, exist_ok=True)
            pixels = np.clip(colours[i % classes] + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


RUNNING = set()  # the processes of the steps now running


def stop(signum, frame):
    """A SIGTERM or SIGINT to this script (a time limit) ends the runs it started too: they have their own sessions."""
    for process in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    os._exit(128 + signum)  # the summary holds the lines of the paths that ended


class Failed(Exception):
    """A path's failure, as its summary line gives it."""


def last_error_line(text):
    """The last line of a log that names an error (an exception, `error: ...`), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(error:|[\w.]*(Error|Exception|Failed)\b)", line)]
    return (errors or lines or ["no output"])[-1]


def run_step(argv, log_path, deadline, expect=0):
    """Run argv, its output appended to log_path, in its own session (a time limit ends its workers too) until
    `deadline` (time.monotonic()); raises Failed with the last error line of its output unless it exits `expect`."""
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        offset = log.tell()  # this step's output starts here
        # 2 compile workers a run: the 8 compile paths share the machine's cores (16 on the H200's), unless set
        env = {"TORCHINDUCTOR_COMPILE_THREADS": "2", **os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        RUNNING.add(process)
        limit = max(0.0, deadline - time.monotonic())
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
        RUNNING.discard(process)
    with open(log_path) as log:
        log.seek(offset)
        line = last_error_line(log.read())
    if code is None:
        raise Failed(f"timed out after {limit:.0f} s; last line: {line}")
    if code != expect:
        raise Failed(f"{line} (exit {code}, expected {expect})" if expect else line)


# METHOD.py's main, sent SIGTERM after optimiser step {steps} from outside the loop: the method's optimizer_step is
# wrapped, as a scheduler's notice would come mid-epoch (conftest.signal_after, standalone)
SIGTERM_AFTER = """
import os, signal, sys
sys.path.insert(0, {here!r})
import {method} as module
step, calls = module.optimizer_step, []
def optimizer_step(*args):
    step(*args)
    calls.append(1)
    if len(calls) == {steps}:
        os.kill(os.getpid(), signal.SIGTERM)
module.optimizer_step = optimizer_step
module.main(module.parse_args(sys.argv[1:]))
"""


def evaluated(run_dir, epochs):
    """Raises Failed unless the run's last record is the evaluation after its last epoch."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    if (last["type"], last["epoch"]) != ("eval", epochs):
        raise Failed(f"no evaluation after epoch {epochs} in {run_dir}/metrics.jsonl")


def weight_difference(straight, resumed):
    """(tensors that differ, their number, the largest absolute difference) of two checkpoints' model states."""
    a, b = (torch.load(path, map_location="cpu", weights_only=True)["model"] for path in (straight, resumed))
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    largest = max([(a[k].double() - b[k].double()).abs().max().item() for k in differ], default=0.0)
    return differ, len(a), largest


def check(path, args, data_dir, deadline):
    """Run one path; returns what its summary line adds after the seconds (or ''), raises Failed."""
    method, pipeline, precision, mode = path.split("/")
    name = path.replace("/", "-")
    log = os.path.join(args.out, "logs", f"{name}.log")
    runs = os.path.join(os.path.abspath(args.out), "runs")
    flags = ["--dataset", "folder", "--data-dir", data_dir, "--arch", args.arch, "--batch-size", str(args.batch_size),
             "--device", args.device, "--num-workers", str(args.num_workers), "--log-every", "1", "--precision",
             precision, "--pipeline", pipeline, "--out-dir", runs]
    script = [sys.executable, os.path.join(HERE, f"{method}.py")]
    if not mode.startswith("resume"):
        run_step(script + flags + ["--epochs", "1", "--run-name", name] + MODES[mode], log, deadline)
        evaluated(os.path.join(runs, name), 1)
        return ""
    flags += ["--epochs", "2"] + (["--deterministic"] if mode == "resume-deterministic" else [])
    per_epoch = args.images // args.batch_size
    steps = per_epoch + max(1, per_epoch // 2)  # mid-epoch 2
    run_step(script + flags + ["--run-name", f"{name}-straight"], log, deadline)
    stopped = SIGTERM_AFTER.format(here=HERE, method=method, steps=steps)
    run_step([sys.executable, "-c", stopped] + flags + ["--run-name", f"{name}-stopped"], log, deadline, expect=143)
    run_step(script + ["--resume", os.path.join(runs, f"{name}-stopped", "checkpoint.pt")], log, deadline)
    evaluated(os.path.join(runs, f"{name}-stopped"), 2)
    differ, total, largest = weight_difference(*(os.path.join(runs, f"{name}-{run}", "checkpoint.pt")
                                                 for run in ("straight", "stopped")))
    if mode == "resume":
        return f"SIGTERM at step {steps}, resumed: max abs weight difference {largest:.3g} (not asserted)"
    if differ:
        raise Failed(f"resumed weights differ from the uninterrupted run's in {len(differ)} of {total} tensors (max "
                     f"abs {largest:.3g}; first {differ[0]}); ops without a deterministic kernel warn in its log")
    return f"SIGTERM at step {steps}, resumed: bit-exact ({total} tensors)"


def main(args):
    paths, skipped = smoke_paths(args.methods, args.skip, args.device)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    data_dir = write_image_folder(os.path.abspath(os.path.join(args.out, "data")), args.images)
    summary, lines, lock = os.path.join(args.out, "smoke.txt"), {}, threading.Lock()
    header = (f"# smoke of every GPU path: {args.device}, {args.arch}, {args.images} images, batch {args.batch_size}; "
              f"{args.parallel} at a time, {args.timeout} s each, {args.budget} s in all")
    print(header, flush=True)
    started = time.monotonic()
    deadline = started + args.budget

    def one(path):
        began = time.monotonic()
        if deadline - began < STARTS_WITHIN:
            line = f"failed {path}: not started, the {args.budget} s budget was spent (raise --budget or --parallel)"
        else:
            try:
                detail = check(path, args, data_dir, min(deadline, began + args.timeout))
                line = f"ok {path} {time.monotonic() - began:.1f} s" + (f": {detail}" if detail else "")
            except Failed as failure:
                line = f"failed {path}: {failure}"
            except Exception as exc:  # a bug of this script: one path's line, the rest go on
                line = f"failed {path}: smoke.py raised {type(exc).__name__}: {exc}"
        with lock:  # as each path ends: a time limit on this script keeps the lines so far
            lines[path] = line
            print(line, flush=True)
            with open(summary, "a") as f:
                f.write(line + "\n")

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(one, paths))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    text = "\n".join([header] + [lines.get(p) or f"skipped {p}: {skipped[p]}" for p in all_paths(args.methods)]) + "\n"
    atomic_write(summary, "w", lambda f: f.write(text))  # in path order
    failed = [path for path, line in lines.items() if line.startswith("failed")]
    if failed:  # the end of each failed path's log, to read without unpacking the logs
        with open(os.path.join(args.out, "smoke_failures.txt"), "w") as f:
            for path in failed:
                log = os.path.join(args.out, "logs", f"{path.replace('/', '-')}.log")
                tail = open(log).read().splitlines()[-30:] if os.path.isfile(log) else ["(not started)"]
                f.write(f"== {lines[path]}\n" + "\n".join(tail) + "\n")
    print(f"{len(paths) - len(failed)} of {len(paths)} paths ok, {len(skipped)} skipped, "
          f"{time.monotonic() - started:.0f} s; wrote {summary}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main(parse_args())
