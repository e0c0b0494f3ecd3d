# Linear and kNN evaluation of a frozen pretrained backbone — needs common.py beside it
"""Rebuild the backbone of any method's run, freeze it, and measure how linearly separable (and how
kNN-separable) its features are on clean images of the labelled train/test splits.

Usage:
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt                    # fast probe: seconds to minutes
    python eval_linear.py --checkpoint runs/NAME/backbone.pt                      # reads runs/NAME/args.json
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt --protocol intl    # INTL's 92.60% protocol
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt --protocol augmented   # crops + flips, slower
    python eval_linear.py --checkpoint runs/NAME/checkpoint.pt --random-init      # baseline: same arch, untrained
Linear protocols (--protocol), each named for its source:
    fast       cached, standardised clean features; Adam lr 1e-3, cosine, weight decay 1e-6, batch 256, 100 epochs
    intl       INTL's (winci-ai/INTL 0aa69af cifar/eval/evaluate.py): cached clean features, not standardised;
               Adam lr 1e-2 decayed exponentially to 1e-6 over 500 epochs, weight decay 5e-6, batch 1000
    augmented  random crops (0.08-1) + flips through the frozen backbone every epoch; SGD lr 0.1, cosine, 100 epochs
    intl-imagenet  INTL's ImageNet protocol (0aa69af evaluate.py): frozen backbone in eval mode, fc N(0, 0.01), random
               crops 224 (bilinear, 0.08-1) + flips; SGD momentum 0.9, lr 0.4 x batch / 256, x0.1 at epochs 60 and 80 of
               100, weight decay 0 (since e1d75d7; 1e-5 when its 76.6% was posted at d2bfe9a: which made it, unknown)
Also reported: weighted kNN (k=200, T=0.1, cosine; lightly's benchmark), 5-NN (cosine, majority) and INTL's
5-NN (Euclidean on raw features, majority). Saved as linear_eval[_random_init][_PROTOCOL].json beside the
checkpoint (no suffix for fast).
"""
import argparse
import json
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import (DATASETS, Bounded, accuracy, atomic_write, build_backbone, dataset_source, die, eval_transform,
                    extract_features, knn_predict, linear_probe, load_checkpoint, loader_kwargs, parse_or_die,
                    positive_int, resolve_device, seed_everything, set_lr, top1_top5, warmup_cosine)


PROTOCOLS = {"fast": dict(epochs=100, batch_size=256, lr=1e-3), "intl": dict(epochs=500, batch_size=1000, lr=1e-2),
             "augmented": dict(epochs=100, batch_size=256, lr=0.1),
             "intl-imagenet": dict(epochs=100, batch_size=256, lr=0.4, weight_decay=0.0)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a run's checkpoint.pt or backbone.pt")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="evaluate on another dataset (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's --data-dir)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="fast",
                        help="linear evaluation protocol, see above (default: %(default)s)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate a randomly initialised backbone of the run's arch: the baseline a run must beat")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="linear classifier epochs (default: the protocol's: 100, 500 intl)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="linear classifier batch size (default: the protocol's: 256, 1000, 256, 256)")
    parser.add_argument("--lr", type=Bounded(float, gt=0), default=None,
                        help="peak learning rate (default: the protocol's: 1e-3 Adam, 1e-2 Adam, 0.1 SGD, 0.4 SGD)")
    parser.add_argument("--weight-decay", type=Bounded(float, ge=0), default=None,
                        help="weight decay of the intl-imagenet protocol (default: 0; 1e-5 as INTL before e1d75d7)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    parser.add_argument("--num-workers", type=Bounded(int, ge=0), default=min(8, torch.get_num_threads()),
                        help="data loading processes, 0 loads in the main process (default: %(default)s)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="evaluate without the unreadable images of a --dataset folder (default: stop, list them)")
    parser.add_argument("--seed", type=Bounded(int, ge=0, le=2**32 - 1), default=0,
                        help="seeds the classifier's data order (default: %(default)s)")
    args = parse_or_die(parser, argv)
    args.device = resolve_device(args.device)
    for name, value in {"weight_decay": 0.0, **PROTOCOLS[args.protocol]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def intl_probe_lr(epoch, epochs=500, lr=1e-2, final_lr=1e-6):
    """INTL's probe schedule: ExponentialLR with gamma = (final_lr / lr)^(1 / epochs), stepped once
    an epoch, so epoch e (from 0) trains at lr gamma^e and the last at lr (final_lr / lr)^(1 - 1/epochs)."""
    return lr * (final_lr / lr) ** (epoch / epochs)


def intl_linear_probe(train_features, train_labels, test_features, test_labels, num_classes, epochs=500,
                      batch_size=1000, lr=1e-2, weight_decay=5e-6, seed=0):
    """INTL's linear evaluation (winci-ai/INTL 0aa69af cifar/eval/evaluate.py): a Linear (default
    init) on the raw cached features, Adam, the exponential schedule of intl_probe_lr, shuffled
    full batches of batch_size (the remainder dropped, as its randperm(...).view(-1, 1000)).
    Returns (top1, top5) test accuracy in %."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = nn.Linear(train_features.shape[1], num_classes).to(train_features.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    batches = max(1, len(train_features) // batch_size)
    for epoch in range(epochs):
        set_lr(optimizer, intl_probe_lr(epoch, epochs, lr))
        order = torch.randperm(len(train_features), generator=generator).to(train_features.device)
        for index in order[:batches * min(batch_size, len(order))].view(batches, -1):
            loss = F.cross_entropy(classifier(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return top1_top5(classifier, test_features, test_labels)


def load_backbone(path):
    """(backbone state dict, the run's arguments) from a checkpoint.pt or a backbone.pt."""
    state = load_checkpoint(path)
    if "model" in state and "args" in state and isinstance(state["model"], dict):  # checkpoint.pt: the online backbone
        weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
        return weights, state["args"]
    args_path = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")
    if not os.path.isfile(args_path):
        die(f"{path} is a bare state dict and there is no args.json beside it to say which arch it is")
    with open(args_path) as f:
        return state, json.load(f)


def step_lr(epoch, epochs, lr):
    """INTL's ImageNet schedule (MultiStepLR at 60 and 80 of 100 epochs, gamma 0.1), for any number of epochs."""
    return lr * 0.1 ** ((epoch >= 0.6 * epochs) + (epoch >= 0.8 * epochs))


def train_linear_augmented(backbone, feature_dim, train_loader, test_features, test_labels, num_classes,
                           epochs, lr, device, imagenet=False, weight_decay=0.0):
    """Linear classifier on features of randomly cropped and flipped images through the frozen backbone (BN in
    eval mode), SGD momentum 0.9 with a cosine schedule; imagenet: INTL's, fc N(0, 0.01) and step_lr. Returns
    (top1, top5) in %."""
    classifier = nn.Linear(feature_dim, num_classes).to(device)
    if imagenet:
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total_steps, step = epochs * len(train_loader), 0
    for epoch in range(epochs):
        for images, labels in train_loader:
            with torch.no_grad():
                features = backbone(images.to(device, non_blocking=True)).float()   # (B, F)
            set_lr(optimizer, step_lr(epoch, epochs, lr) if imagenet else warmup_cosine(step, total_steps, 0, lr))
            loss = F.cross_entropy(classifier(features), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        print(f"linear epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    return top1_top5(classifier, test_features.to(device), test_labels)


def main(args):
    seed_everything(args.seed)
    device = torch.device(args.device)
    weights, run_args = load_backbone(args.checkpoint)
    run = SimpleNamespace(**{**run_args, "device": args.device, "num_workers": args.num_workers})
    run.dataset = args.dataset or run.dataset
    run.data_dir = args.data_dir or getattr(run, "eval_data_dir", None) or run.data_dir  # unlabelled: its labelled one
    source = dataset_source(run.dataset, run.data_dir, run.image_size, run.synthetic_size, args.skip_bad_images)
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
    if not num_classes:  # a folder of unlabelled images (README: Your own images)
        die(f"{run.data_dir} holds no labelled images to probe with; pass --data-dir DIR with "
            f"DIR/{{train,test}}/<class>/*")
    loader = lambda dataset, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        dataset, batch_size=args.batch_size if shuffle else 512, shuffle=shuffle,
        **loader_kwargs(run.num_workers, run.device))
    origin = "randomly initialised" if args.random_init else f"from {args.checkpoint}"
    print(f"{run.method} {run.arch} backbone {origin}; features of {run.dataset} "
          f"({len(train_set)} train / {len(test_set)} test)")
    train_features, train_labels = extract_features(backbone, loader(train_set, False), device)
    test_features, test_labels = extract_features(backbone, loader(test_set, False), device)

    knn = lambda **kw: accuracy(  # noqa: E731
        knn_predict(train_features, train_labels, test_features, num_classes, **kw), test_labels)
    results = {"knn_top1": knn(), "knn5_top1": knn(k=5, weighted=False),
               "knn5_euclidean_top1": knn(k=5, weighted=False, metric="euclidean")}
    if args.protocol in ("augmented", "intl-imagenet"):
        imagenet = args.protocol == "intl-imagenet"  # torchvision's default bilinear crops, as INTL's evaluate.py
        interpolation = T.InterpolationMode.BILINEAR if imagenet else T.InterpolationMode.BICUBIC
        augmented = T.Compose([T.RandomResizedCrop(source.image_size, scale=(0.08, 1.0), interpolation=interpolation),
                               T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(source.mean, source.std)])
        lr = args.lr * args.batch_size / 256 if imagenet else args.lr
        top1, top5 = train_linear_augmented(
            backbone, feature_dim, loader(source.make("train", augmented), True), test_features, test_labels,
            num_classes, args.epochs, lr, device, imagenet, args.weight_decay)
    elif args.protocol == "intl":
        top1, top5 = intl_linear_probe(train_features, train_labels, test_features, test_labels, num_classes,
                                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    else:
        top1, top5 = linear_probe(train_features, train_labels, test_features, test_labels, num_classes,
                                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    results.update(linear_top1=top1, linear_top5=top5, protocol=args.protocol, random_init=args.random_init,
                   epochs=args.epochs, weight_decay=args.weight_decay, checkpoint=os.path.abspath(args.checkpoint),
                   dataset=run.dataset)
    out_name = "linear_eval" + ("_random_init" if args.random_init else "") + \
        ("" if args.protocol == "fast" else f"_{args.protocol}")
    out_path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), out_name + ".json")
    atomic_write(out_path, "w", lambda f: json.dump(results, f, indent=2))
    print(f"linear ({args.protocol} protocol) top1 {top1:.2f} top5 {top5:.2f} | weighted knn top1 "
          f"{results['knn_top1']:.2f} | 5-nn top1 {results['knn5_top1']:.2f} (cosine), "
          f"{results['knn5_euclidean_top1']:.2f} (euclidean, INTL's) -> {out_path}")


if __name__ == "__main__":
    main(parse_args())
