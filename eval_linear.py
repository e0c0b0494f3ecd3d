# Linear and kNN evaluation of a frozen pretrained backbone — needs common.py beside it
"""Rebuild the backbone of any method's run, freeze it, and measure how linearly separable (and how
kNN-separable) its features are on clean images of the labelled train/test splits.

Usage:
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt     # cached features: seconds to minutes
    python eval_linear.py --checkpoint runs/NAME/backbone.pt       # reads runs/NAME/args.json for the arch
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt --augment --epochs 100   # slower protocol
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt --random-init  # baseline: same arch, untrained
Default: a linear classifier on cached, standardised features (Adam, 100 epochs). --augment instead
passes random crops and flips through the frozen backbone every epoch (SGD, lr 0.1, cosine), as in
solo-learn's linear evaluation. Results are printed and saved as linear_eval.json beside the checkpoint.
"""
import argparse
import json
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import (
    DATASETS, accuracy, build_backbone, dataset_source, die, eval_transform, extract_features,
    knn_predict, linear_probe, load_checkpoint, loader_kwargs, positive_int, resolve_device,
    seed_everything, set_lr, warmup_cosine,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a run's checkpoint.pt or backbone.pt")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="evaluate on another dataset (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's --data-dir)")
    parser.add_argument("--augment", action="store_true",
                        help="train on random crops + flips through the frozen backbone instead of cached clean features")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate a randomly initialised backbone of the run's arch instead: the baseline a run must beat")
    parser.add_argument("--epochs", type=positive_int, default=100, help="linear classifier epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="linear classifier batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 1e-3 Adam on cached features, 0.1 SGD with --augment)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=min(8, torch.get_num_threads()),
                        help="data loading processes, 0 loads in the main process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the classifier's data order (default: %(default)s)")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    return args


def load_backbone(path):
    """(backbone state dict, the run's arguments) from a checkpoint.pt or a backbone.pt."""
    state = load_checkpoint(path)
    if "model" in state and "args" in state and isinstance(state["model"], dict):  # checkpoint.pt: the online backbone's weights
        weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
        return weights, state["args"]
    args_path = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")
    if not os.path.isfile(args_path):
        die(f"{path} is a bare state dict and there is no args.json beside it to say which arch it is")
    with open(args_path) as f:
        return state, json.load(f)


def train_linear_augmented(backbone, feature_dim, train_loader, test_features, test_labels, num_classes,
                           epochs, lr, device):
    """Linear classifier on features of randomly cropped and flipped images through the frozen
    backbone (BN in eval mode), SGD momentum 0.9 with a cosine schedule. Returns (top1, top5) in %."""
    classifier = nn.Linear(feature_dim, num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9)
    total_steps, step = epochs * len(train_loader), 0
    for epoch in range(epochs):
        for images, labels in train_loader:
            with torch.no_grad():
                features = backbone(images.to(device, non_blocking=True)).float()   # (B, F)
            set_lr(optimizer, warmup_cosine(step, total_steps, 0, lr))
            loss = F.cross_entropy(classifier(features), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        print(f"linear epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        top5 = classifier(test_features.to(device)).topk(min(5, num_classes), dim=1).indices.cpu()
    return accuracy(top5[:, 0], test_labels), (top5 == test_labels[:, None]).any(dim=1).float().mean().item() * 100


def main(args):
    seed_everything(args.seed)
    device = torch.device(args.device)
    weights, run_args = load_backbone(args.checkpoint)
    run = SimpleNamespace(**{**run_args, "device": args.device, "num_workers": args.num_workers})
    run.dataset = args.dataset or run.dataset
    run.data_dir = args.data_dir or run.data_dir
    source = dataset_source(run)
    backbone, feature_dim = build_backbone(run.arch, source.image_size)
    if not args.random_init:
        try:
            backbone.load_state_dict(weights)
        except RuntimeError as exc:
            die(f"{args.checkpoint} does not hold a {run.arch} backbone: {str(exc).splitlines()[0]}")
    backbone.to(device).eval().requires_grad_(False)

    clean = eval_transform(source.image_size, source.mean, source.std)
    train_set, test_set = source.make("train", clean), source.make("test", clean)
    num_classes = len(train_set.classes)
    loader = lambda dataset, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        dataset, batch_size=args.batch_size if shuffle else 512, shuffle=shuffle, **loader_kwargs(run))
    print(f"{run.method} {run.arch} backbone {'randomly initialised' if args.random_init else 'from'} {args.checkpoint}; features of {run.dataset} "
          f"({len(train_set)} train / {len(test_set)} test)")
    train_features, train_labels = extract_features(backbone, loader(train_set, False), device)
    test_features, test_labels = extract_features(backbone, loader(test_set, False), device)

    results = {
        "knn_top1": accuracy(knn_predict(train_features, train_labels, test_features, num_classes), test_labels),
        "knn5_top1": accuracy(knn_predict(train_features, train_labels, test_features, num_classes, k=5,
                                          weighted=False), test_labels),
    }
    if args.augment:
        augmented = T.Compose([
            T.RandomResizedCrop(source.image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(source.mean, source.std)])
        top1, top5 = train_linear_augmented(
            backbone, feature_dim, loader(source.make("train", augmented), True), test_features, test_labels,
            num_classes, args.epochs, args.lr or 0.1, device)
    else:
        top1, top5 = linear_probe(train_features, train_labels, test_features, test_labels, num_classes,
                                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr or 1e-3, seed=args.seed)
    results.update(linear_top1=top1, linear_top5=top5, protocol="augmented" if args.augment else "cached",
                   random_init=args.random_init,
                   epochs=args.epochs, checkpoint=os.path.abspath(args.checkpoint), dataset=run.dataset)
    out_name = "linear_eval" + ("_random_init" if args.random_init else "") + ("_augmented" if args.augment else "")
    out_path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), out_name + ".json")
    with open(out_path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(out_path + ".tmp", out_path)
    print(f"linear top1 {top1:.2f} top5 {top5:.2f} | knn top1 {results['knn_top1']:.2f} "
          f"5-nn top1 {results['knn5_top1']:.2f} -> {out_path}")


if __name__ == "__main__":
    main(parse_args())
