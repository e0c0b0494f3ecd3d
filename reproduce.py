# Reproduce the results table — needs the method files and common.py beside it
"""Train the chosen methods for one budget, then print and write one table: our numbers beside the
published ones at the same budget and protocol (never an estimate: "—" where no reference exists).

Usage:
    python reproduce.py --dataset folder --data-dir cifar10 --epochs 200 --batch-size 512       # one GPU
    python reproduce.py --dataset cifar10 --epochs 1000                                         # the papers' budget
    python reproduce.py --runs byol "byol --ortho so" "byol --ortho srip" --seeds 0 1 2 --epochs 200
    python reproduce.py --dataset synthetic --epochs 2 --methods intl simclr --synthetic-size 500   # CPU check
Offline GPU machine: `tar xzf cifar10.tar.gz` (the CIFAR-10 ImageFolder tree) and pass
`--dataset folder --data-dir cifar10`. Each run is `python METHOD.py ...` in a subprocess, `--parallel`
of them at a time (several small runs can share one GPU). Writes OUT/results.md and OUT/results.json;
every run's folder is OUT/runs/NAME (metrics.jsonl, checkpoint.pt). SIGTERM or Ctrl-C (a time limit) stops
every run at its current step (each writes its checkpoint, to --resume) and the table shows how far each got.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

METHODS = ("simclr", "byol", "vicreg", "intl")
HERE = os.path.dirname(os.path.abspath(__file__))

# Published numbers: (method, recipe, epochs, batch) -> [(protocol, our metric, top-1 %, source)]; our metric None:
# the protocol is a separate command (eval_linear.py), not in this table. CIFAR-10 and ImageNet-100: ResNet-18.
# lightly's benchmark (docs "Benchmarks", CIFAR-10, batch 512, single A6000, best epoch) trains another
# recipe: SGD 0.06 x batch / 128, weight decay 5e-4, SimCLR temperature 0.5, BYOL EMA fixed at 0.99.
LIGHTLY = "lightly CIFAR-10 benchmark (kNN k=200 T=0.1, best epoch; its own recipe: SGD 0.06xbs/128, wd 5e-4)"
SOLO = "solo-learn fca55e3 README (online linear probe, last epoch)"
INTL = "winci-ai/INTL README (INTL probe / Euclidean 5-NN)"
INTL_IN = "winci-ai/INTL README d2bfe9a..0aa69af (ResNet-50, multi-crop, EMA; eval_linear.py --protocol intl-imagenet)"
IN100_SOLO = "solo-learn fca55e3 README, ImageNet-100 (online linear probe, last epoch)"
IN100_INTL = "winci-ai/INTL README 5b9aebe (scripts/in100.sh; its 5-NN code is not in the repository)"
REFERENCES = {
    ("simclr", "cifar", 200, 512): [("weighted kNN, best epoch", "knn_best", 84.8, LIGHTLY)],
    ("byol", "cifar", 200, 512): [("weighted kNN, best epoch", "knn_best", 86.8, LIGHTLY)],
    ("simclr", "cifar", 800, 512): [("weighted kNN, best epoch", "knn_best", 87.9, LIGHTLY)],
    ("byol", "cifar", 800, 512): [("weighted kNN, best epoch", "knn_best", 91.0, LIGHTLY)],
    ("simclr", "cifar", 1000, 256): [("online probe", "online_last", 90.74, SOLO)],
    ("byol", "cifar", 1000, 256): [("online probe", "online_last", 92.58, SOLO)],
    ("vicreg", "cifar", 1000, 256): [("online probe", "online_last", 92.07, SOLO)],
    ("intl", "cifar", 1000, 256): [("INTL 5-NN (Euclidean)", "knn5_euclidean_last", 90.03, INTL)],
    ("simclr", "imagenet100", 400, 256): [("online probe", "online_last", 77.04, IN100_SOLO)],
    ("byol", "imagenet100", 400, 256): [("online probe", "online_last", 79.76, IN100_SOLO)],
    ("vicreg", "imagenet100", 400, 256): [("online probe", "online_last", 79.22, IN100_SOLO)],
    ("intl", "imagenet100", 400, 128): [("linear (INTL's ImageNet protocol)", None, 81.68, IN100_INTL),
                                        ("5-NN", "knn5_euclidean_last", 73.46, IN100_INTL)],
    **{("intl", "imagenet", epochs, 256): [("linear (INTL's ImageNet protocol)", None, top1, INTL_IN)]
       for epochs, top1 in ((100, 73.5), (200, 75.2), (400, 76.1), (800, 76.6))},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to train with their own recipes (default: all)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="'METHOD [FLAGS]'",
                        help="runs with extra flags instead of --methods, e.g. byol 'byol --ortho so'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of every run (default: 0)")
    parser.add_argument("--recipe", choices=("cifar", "imagenet100", "imagenet"), default="cifar",
                        help="--recipe of the runs (imagenet: INTL only) (default: %(default)s)")
    parser.add_argument("--dataset", default="cifar10", help="--dataset of the runs (default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="--data-dir of the runs (default: %(default)s)")
    parser.add_argument("--synthetic-size", type=int, default=None, help="--synthetic-size of the runs")
    parser.add_argument("--epochs", type=int, required=True, help="pretraining epochs of every run")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: each recipe's)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluation interval (default: the runs')")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once, e.g. on one GPU (default: 1)")
    parser.add_argument("--device", default="auto", help="--device of the runs (default: %(default)s)")
    parser.add_argument("--out", default="reproduce", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    specs = args.runs or args.methods
    for spec in specs:
        if not spec.split() or spec.split()[0] not in METHODS:
            parser.error(f"a run must start with one of {', '.join(METHODS)}: got {spec!r}")
    if args.recipe == "imagenet" and any(spec.split()[0] != "intl" for spec in specs):
        parser.error("--recipe imagenet is INTL's alone (the others publish ImageNet-100 recipes): --methods intl")
    if args.epochs < 1 or args.parallel < 1:
        parser.error("--epochs and --parallel must be at least 1")
    if os.path.exists(os.path.join(args.out, "results.json")):
        parser.error(f"{args.out}/results.json exists: pass another --out (nothing is overwritten)")
    args.specs = specs
    return args


def run_command(spec, seed, args):
    """(run name, argv) of one run: the method file with the shared budget and the spec's own flags."""
    method, *extra = shlex.split(spec)
    name = "-".join([method] + [flag.lstrip("-") for flag in extra] + [f"s{seed}"])
    argv = [sys.executable, os.path.join(HERE, f"{method}.py"), "--recipe", args.recipe, "--dataset", args.dataset,
            "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--seed", str(seed), "--device", args.device,
            "--out-dir", os.path.join(args.out, "runs"), "--run-name", name, "--log-every", "20"]
    for flag, value in (("--batch-size", args.batch_size), ("--eval-every", args.eval_every),
                        ("--synthetic-size", args.synthetic_size)):
        if value is not None:
            argv += [flag, str(value)]
    return name, argv + extra


def summarise(run_dir):
    """What the table shows of one run, read from its metrics.jsonl and args.json; None before its first
    evaluation after training began (no metrics yet, or only the untrained backbone's)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    records = [json.loads(line) for line in open(metrics)] if os.path.isfile(metrics) else []
    evals = [r for r in records if r["type"] == "eval" and r["epoch"] > 0]
    if not evals:
        return None
    train = [r for r in records if r["type"] == "train"]
    run_args = json.load(open(os.path.join(run_dir, "args.json")))
    rates = sorted(r["images_per_s"] for r in train)
    last = evals[-1]  # a stopped run's last evaluation: epochs is how far it got, budget what it was to train
    return {"method": run_args["method"], "recipe": run_args["recipe"], "epochs": last["epoch"],
            "budget": run_args["epochs"],
            "batch": run_args["batch_size"],
            "images_per_s": rates[len(rates) // 2] if rates else None,
            "knn_best": max(r["knn_top1"] for r in evals), "knn_last": last["knn_top1"],
            "online_last": last.get("online_top1"), "knn5_euclidean_last": last.get("knn5_euclidean_top1"),
            "linear_last": last.get("linear_top1")}


def launch_all(commands, parallel):
    """Run the (name, argv, log path) commands, `parallel` at a time; returns {name: (exit code, seconds)} and
    the signal that stopped them (0: none). A SIGTERM or SIGINT starts no more runs and sends each running one
    SIGTERM: it finishes its step, writes its checkpoint and exits 143 (a second signal is forwarded too: the
    runs then stop at once, their last checkpoint kept). The runs have their own sessions, so a terminal's
    Ctrl-C reaches them only through this process."""
    pending, running, done, received, forwarded = list(commands), {}, {}, [], 0
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    while pending or running:
        if forwarded < len(received):  # a second signal is forwarded too: the runs then stop at once
            forwarded += 1
            print(f"{signal.Signals(received[0]).name}: stopping {', '.join(running) or 'nothing'}; not starting "
                  f"{', '.join(name for name, _, _ in pending) or 'more'}", flush=True)
            pending.clear()
            for process, _, _ in running.values():
                process.send_signal(signal.SIGTERM)
        while pending and len(running) < parallel:
            name, argv, log_path = pending.pop(0)
            log = open(log_path, "w")
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                             time.time(), log)
            print(f"started {name}: {shlex.join(argv[1:])}", flush=True)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                done[name] = (process.returncode, time.time() - started)
                print(f"finished {name}: exit {process.returncode} after {done[name][1]:.0f} s", flush=True)
                del running[name]
        time.sleep(0.5)
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    return done, received[0] if received else 0


def table(rows):
    """The markdown table: one line per run, then the published numbers at the same budget."""
    cell = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
    lines = ["| run | epochs | batch | wall time | images/s | weighted kNN best / last | online probe (last) | "
             "fast linear probe | published, same budget and protocol |", "|" + "---|" * 9]
    for row in rows:
        finished = row["epochs"] == row.get("budget", row["epochs"])  # a stopped run matches no published budget
        references = REFERENCES.get((row["method"], row["recipe"], row["epochs"], row["batch"]), []) if finished else []
        epochs = row["epochs"] if finished else f"{row['epochs']} of {row['budget']} (stopped)"
        ours = lambda metric: cell(row.get(metric)) if metric else "not in this table"  # noqa: E731
        published = "; ".join(f"{value} ({protocol}; ours {ours(metric)}) — {source}"
                              for protocol, metric, value, source in references)
        lines.append(f"| {row['name']} | {epochs} | {row['batch']} | {row['seconds'] / 60:.1f} min | "
                     f"{cell(row['images_per_s'], '{:,.0f}')} | {cell(row['knn_best'])} / {cell(row['knn_last'])} | "
                     f"{cell(row['online_last'])} | {cell(row['linear_last'])} | {published or '—'} |")
    return "\n".join(lines)


def main(args):
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    commands = [(name, argv, os.path.join(args.out, "logs", f"{name}.log"))
                for spec in args.specs for seed in args.seeds for name, argv in [run_command(spec, seed, args)]]
    started = time.time()
    done, stopped_by = launch_all(commands, args.parallel)
    rows, failed = [], []
    for name, _, log_path in commands:
        if name not in done:
            failed.append(f"{name} (not started)")
            continue
        code, seconds = done[name]
        summary = summarise(os.path.join(args.out, "runs", name)) if code == 0 or stopped_by else None
        if summary:  # finished, or stopped after an evaluation: how far it got
            rows.append({"name": name, "seconds": seconds, **summary})
        else:
            failed.append(f"{name} (exit {code}, see {log_path})")
    text = table(rows)
    header = (f"{args.dataset}, {args.epochs} epochs, {len(commands)} runs, {args.parallel} at a time, "
              f"{(time.time() - started) / 60:.1f} min in all")
    print(header + "\n" + text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n\n" + text + "\n")
    references = {" ".join(map(str, key)): value for key, value in REFERENCES.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"dataset": args.dataset, "epochs": args.epochs, "parallel": args.parallel, "runs": rows,
                   "failed": failed, "references": references}, f, indent=2)
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    if stopped_by or failed:
        raise SystemExit(128 + stopped_by if stopped_by else 1)


if __name__ == "__main__":
    main(parse_args())
