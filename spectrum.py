# Spectra of trained weights and features, to see dimensional collapse — needs common.py beside it
"""Sorted singular values of every regularised weight matrix and eigenvalues of feature
covariances (the input to each backbone stage and its output, the representation, the projector
output) of one or more runs, side by side: the curves of the OR paper's figures.

Usage:
    python spectrum.py runs/A/checkpoint.pt runs/B/checkpoint.pt --labels "no OR" SO --out spectrum
Writes OUT.json always (every spectrum and its effective rank) and OUT.png when matplotlib is
installed (an optional extra: pip install matplotlib). Features come from
--num-images clean test images, evenly spaced through each run's test set.
"""
import argparse
import json
import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from common import (OrthogonalityRegularizer, build_backbone, dataset_source, die, effective_rank, eval_transform,
                    load_checkpoint, parse_or_die, positive_int, resolve_device, weight_matrix)


# Spectra, to see dimensional collapse: sorted singular values of the weights and eigenvalues of
# feature covariances, as in the OR paper's figures. common.effective_rank() summarises each.
def weight_spectra(named_layers):
    """{name: singular values of its weight matrix, descending} for (name, layer) pairs."""
    with torch.no_grad():
        return {name: torch.linalg.svdvals(weight_matrix(layer).double()) for name, layer in named_layers}

def covariance_eigenvalues(x):
    """Eigenvalues of the covariance of the rows of x (N, D), in float64, descending."""
    x = x.double()
    x = x - x.mean(dim=0)
    return torch.linalg.eigvalsh(x.T @ x / (len(x) - 1)).flip(0).clamp(min=0)

def feature_stages(backbone):
    """(name, module, which) to hook: a ResNet's input to layer1 (after the stem) and the output of
    each stage; the convnet's output of each ReLU block."""
    if hasattr(backbone, "layer1"):
        stages = [("stem", backbone.layer1, "input")]
        return stages + [(f"layer{i}", getattr(backbone, f"layer{i}"), "output") for i in range(1, 5)]
    relus = [m for m in backbone if isinstance(m, nn.ReLU)]
    return [(f"block{i + 1}", m, "output") for i, m in enumerate(relus)]

@torch.no_grad()
def feature_spectra(backbone, projector, images, batch_size=256):
    """{stage: covariance eigenvalues} of features of images (N, 3, H, W), in eval mode: every
    stage of the backbone (channels averaged over space, (N, C)), the representation and the
    projector output."""
    captured = {}

    def hook(name, which):
        def record(module, inputs, output):
            x = inputs[0] if which == "input" else output
            captured.setdefault(name, []).append(x.float().mean(dim=(2, 3)).cpu())  # (B, C)
        return record

    handles = [m.register_forward_hook(hook(name, which)) for name, m, which in feature_stages(backbone)]
    backbone.eval(), projector.eval()
    rep, proj = [], []
    try:
        for batch in images.split(batch_size):
            h = backbone(batch)
            rep.append(h.float().cpu())
            proj.append(projector(h).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    features = {name: torch.cat(chunks) for name, chunks in captured.items()}
    features.update(representation=torch.cat(rep), projector=torch.cat(proj))
    return {name: covariance_eigenvalues(x) for name, x in features.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint.pt files of method runs")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one legend label per checkpoint (default: each run's --ortho setting and folder name)")
    parser.add_argument("--out", default="spectrum", help="output path without extension (default: %(default)s)")
    parser.add_argument("--num-images", type=positive_int, default=2048,
                        help="test images whose features are measured (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="where the dataset lives (default: each run's --data-dir)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    args = parse_or_die(parser, argv)
    if args.labels and len(args.labels) != len(args.checkpoints):
        parser.error(f"--labels got {len(args.labels)} labels for {len(args.checkpoints)} checkpoints; give one each")
    if args.labels and len(set(args.labels)) != len(args.labels):
        parser.error("--labels must differ from each other: they name the runs in the JSON and the legend")
    args.device = resolve_device(args.device)
    return args


def mlp_from_state_dict(state):
    """Rebuild a projection_mlp (Linear, BatchNorm1d and ReLU in a Sequential) from its weights:
    a 2-D weight is a Linear, running statistics a BatchNorm1d, an index without weights a ReLU."""
    indices = {int(key.split(".")[0]) for key in state}
    layers = []
    for i in range(max(indices) + 1):
        if state.get(f"{i}.weight") is not None and state[f"{i}.weight"].dim() == 2:
            out_dim, in_dim = state[f"{i}.weight"].shape
            layers.append(nn.Linear(in_dim, out_dim, bias=f"{i}.bias" in state))
        elif f"{i}.running_mean" in state:
            layers.append(nn.BatchNorm1d(len(state[f"{i}.running_mean"]), affine=f"{i}.weight" in state))
        else:
            layers.append(nn.ReLU())
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict(state)
    return mlp


def run_spectra(path, num_images, data_dir, device):
    """(run arguments, {"weights": {layer: singular values}, "features": {stage: eigenvalues}})."""
    state = load_checkpoint(path)
    if "model" not in state or "args" not in state:
        die(f"{path} is not a method run's checkpoint.pt (a backbone.pt has no projector); pass checkpoint.pt")
    run = SimpleNamespace(**state["args"])
    run.data_dir = data_dir or run.data_dir
    part = lambda prefix: {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}  # noqa: E731
    source = dataset_source(run.dataset, run.data_dir, run.image_size, run.synthetic_size)
    backbone, _ = build_backbone(run.arch, source.image_size)
    backbone.load_state_dict(part("backbone."))
    projector = mlp_from_state_dict(part("projector."))
    test_set = source.make("test", eval_transform(source.image_size, source.mean, source.std))
    picked = torch.linspace(0, len(test_set) - 1, min(num_images, len(test_set))).long()  # spread over the classes
    images = torch.stack([test_set[i][0] for i in picked.tolist()]).to(device)            # (N, 3, H, W)
    parts = nn.ModuleDict({"backbone": backbone, "projector": projector})
    if part("predictor."):
        parts["predictor"] = mlp_from_state_dict(part("predictor."))
    regulariser = OrthogonalityRegularizer(parts, "none", heads=getattr(run, "ortho_heads", False))  # the run's layers
    layers = list(zip(regulariser.layer_names, regulariser.layers))
    return run, {"weights": weight_spectra(layers),
                 "features": feature_spectra(backbone.to(device), projector.to(device), images)}


def plot(curves, path):
    """One panel per weight layer (a spread of four) and per feature stage; each run one line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(curves.values()))
    weight_names = list(first["weights"])
    picked = (
        [weight_names[round(i * (len(weight_names) - 1) / 3)] for i in range(4)]
        if len(weight_names) > 4
        else weight_names
    )
    panels = [("weights", name, "singular value") for name in dict.fromkeys(picked)]
    panels += [("features", name, "eigenvalue") for name in first["features"]]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (kind, name, ylabel) in zip(axes.flat, panels):
        for label, spectra in curves.items():
            values = torch.tensor(spectra[kind][name]["values"]).clamp(min=1e-12)
            ax.semilogy(range(1, len(values) + 1), values, label=f"{label} (erank {spectra[kind][name]['erank']:.0f})")
        ax.set_title(f"{kind[:-1]}: {name}", fontsize=8)
        ax.set_xlabel("rank", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args):
    curves = {}
    for i, path in enumerate(args.checkpoints):
        run, spectra = run_spectra(path, args.num_images, args.data_dir, torch.device(args.device))
        label = (
            args.labels[i]
            if args.labels
            else f"{getattr(run, 'ortho', 'none')} {os.path.basename(os.path.dirname(os.path.abspath(path)))}"
        )
        if label in curves:
            die(f"two checkpoints would both be labelled '{label}'; name them with --labels")
        curves[label] = {kind: {name: {"erank": effective_rank(values), "values": values.tolist()}
                                for name, values in spectra[kind].items()} for kind in ("weights", "features")}
        curves[label]["checkpoint"] = os.path.abspath(path)
        erank = {name: round(v["erank"], 1) for name, v in curves[label]["features"].items()}
        print(f"{label}: feature effective ranks {erank}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json.tmp", "w") as f:
        json.dump(curves, f)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    try:
        plot(curves, args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")
    except ImportError:
        print(f"wrote {args.out}.json (install matplotlib for {args.out}.png)")


if __name__ == "__main__":
    main(parse_args())
