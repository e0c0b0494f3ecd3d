# Training curves of one or more runs, from their metrics.jsonl — needs common.py beside it, and matplotlib
"""One figure of runs side by side, each run a labelled line (its colour in every panel):

    python plot.py runs/A runs/B --out curves.png                 # labels: the folder names
    python plot.py runs/A runs/B --labels SimCLR BYOL --out curves.png

Panels: the accuracies by epoch under every protocol logged (online probe, weighted kNN, 5-NN, INTL's
5-NN, the fast linear probe at the end); the loss by step, and its terms by step (the online probe's
loss and the --ortho penalty among them); the effective ranks by epoch (representation and projector
output, on clean images) and INTL's by step (its projector output before and after whitening, z_erank
and zhat_erank). A panel that no run logged is left out. metrics.jsonl stays the record: this only draws it.
"""
import argparse
import json
import os

from common import die, parse_or_die

# (title, record type, x axis, series); series None: every number of the record not named in another panel
ACCURACIES = ("online_top1", "knn_top1", "knn5_top1", "knn5_euclidean_top1", "linear_top1")
PANELS = (("accuracy (%)", "eval", "epoch", ACCURACIES),
          ("loss", "train", "step", ("loss",)),
          ("loss terms", "train", "step", None),
          ("effective rank", "eval", "epoch", ("rep_erank", "proj_erank")),
          ("effective rank, INTL's whitening", "train", "step", ("z_erank", "zhat_erank")))
NOT_A_LOSS_TERM = {"type", "epoch", "step", "lr", "images_per_s", "tau", "ema_m", "z_erank", "zhat_erank"}  # EMA rates


def read_records(run_dir):
    """The records of run_dir/metrics.jsonl (or of a metrics.jsonl path), in the order written. A line cut
    short by a crash is left out, saying so."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        die(f"{run_dir} holds no metrics.jsonl; pass run folders that a method file wrote (runs/NAME)")
    records, unreadable = [], 0
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                unreadable += 1
    if unreadable:
        print(f"{path}: left out {unreadable} unreadable line{'s' * (unreadable > 1)} (a run stopped mid-write?)")
    return records


def curves(records):
    """{(record type, key): (xs, ys)}: every number of the records of one type against its x axis (epoch for
    evaluations, step for progress lines), sorted by x. A resumed run may log an x again after a crash:
    the last value written wins."""
    points = {}
    for record in records:
        x = record["epoch"] if record["type"] == "eval" else record["step"]
        for key, value in record.items():
            if key not in ("type", "epoch", "step") and isinstance(value, (int, float)):
                points.setdefault((record["type"], key), {})[x] = value
    return {series: (sorted(xy), [xy[x] for x in sorted(xy)]) for series, xy in points.items()}


def panels(runs):
    """The panels to draw for runs {label: curves(...)}: [(title, x axis, {label: {key: (xs, ys)}})], a panel
    only where some run has one of its series, each run's series in the panel's order."""
    named = {key for _, _, _, keys in PANELS if keys for key in keys}
    drawn = []
    for title, kind, x_axis, keys in PANELS:
        lines = {}
        for label, run in runs.items():
            present = [key for (k, key) in run if k == kind]
            wanted = keys or [key for key in present if key not in named | NOT_A_LOSS_TERM]
            lines[label] = {key: run[(kind, key)] for key in wanted if key in present}
        if any(lines.values()):
            drawn.append((title, x_axis, lines))
    return drawn


def draw(figure_panels, labels, path):
    """One PNG: a panel per entry of figure_panels; each run one colour, each series of a panel one line style
    (marked when by epoch); the y axis logarithmic except for accuracies. matplotlib is imported here."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter, MaxNLocator

    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    styles = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3)))
    columns = min(3, len(figure_panels))
    rows = -(-len(figure_panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False)
    for ax, (title, x_axis, lines) in zip(axes.flat, figure_panels):
        keys = list(dict.fromkeys(key for series in lines.values() for key in series))  # the panel's series
        for label, series in lines.items():
            for key, (xs, ys) in series.items():
                ax.plot(xs, ys, color=colours[label], linestyle=styles[keys.index(key) % len(styles)],
                        marker="o" if x_axis == "epoch" else None, markersize=3, linewidth=1.2, label=f"{label} {key}")
        if not title.startswith("accuracy") and any(y > 0 for series in lines.values() for _, ys in series.values()
                                                    for y in ys):
            ax.set_yscale("log", nonpositive="mask")  # terms and ranks span decades; a 0 is left out
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))  # 3, 30: no 3x10^1
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_axis, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:  # which line style is which series (the colours are the runs, in the figure's legend)
            ax.legend(handles=[Line2D([], [], color="0.3", linestyle=styles[i % len(styles)], label=key)
                               for i, key in enumerate(keys)], fontsize=6)
    for ax in axes.flat[len(figure_panels):]:
        ax.axis("off")
    fig.legend(handles=[Line2D([], [], color=colours[label], label=label) for label in labels],
               loc="upper center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/NAME) holding a metrics.jsonl")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: each folder's name)")
    parser.add_argument("--out", default="curves.png", help="the PNG to write (default: %(default)s)")
    args = parse_or_die(parser, argv)
    args.labels = args.labels or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(args.labels) != len(args.runs) or len(set(args.labels)) != len(args.labels):
        parser.error(f"{len(args.runs)} runs need {len(args.runs)} different labels (--labels), got {args.labels}")
    return args


def main(args):
    runs = {label: curves(read_records(run)) for label, run in zip(args.labels, args.runs)}
    figure_panels = panels(runs)
    if not figure_panels:
        die(f"nothing to draw: no numbers in the metrics.jsonl of {', '.join(args.runs)}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        draw(figure_panels, args.labels, args.out)
    except ImportError as exc:
        die(f"plot.py draws with matplotlib ({exc}): pip install matplotlib")
    except OSError as exc:
        die(f"could not write {args.out}: {exc.strerror or exc}")
    print(f"wrote {args.out}: {', '.join(title for title, _, _ in figure_panels)}; runs {', '.join(args.labels)}")


if __name__ == "__main__":
    main(parse_args())
