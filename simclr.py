# SimCLR (Chen et al., ICML 2020) https://arxiv.org/abs/2002.05709 — needs common.py beside it
"""Contrast two augmented views of each image against every other image in the batch (NT-Xent).

Usage:
    python simclr.py --dataset synthetic                 # offline check: convnet, 40 epochs, 2 CPU cores, 12-16 min
    python simclr.py --dataset cifar10                   # reference recipe: 1000 epochs, one GPU
    python simclr.py --dataset folder --data-dir DIR     # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python simclr.py --resume runs/NAME/checkpoint.pt    # continue a run where it stopped
Defaults are solo-learn's CIFAR configuration behind 90.74% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse

import torch
import torch.nn as nn

from common import (
    ARCHS, AUGMENTATIONS, DATASETS, ORTHO_KINDS, OrthogonalityRegularizer, autocast, build_backbone,
    build_data, build_optimizer, end_of_epoch, finalize_args, optimizer_step, positive_int,
    prepare_model, prepare_run_dir, projection_mlp, resume, RunLogger, seed_everything, set_data_epoch, set_lr,
    warmup_cosine,
)

METHOD = "simclr"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # TRY NOT TO MODIFY: arguments shared by every method file; each method sets its own defaults below
    parser.add_argument("--dataset", choices=DATASETS, default="cifar10",
                        help="cifar10/cifar100/stl10 download into --data-dir; folder reads DATA_DIR/train and "
                             "DATA_DIR/test (or val) in ImageFolder layout; synthetic is generated offline (default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="where datasets are read or downloaded (default: %(default)s)")
    parser.add_argument("--synthetic-size", type=positive_int, default=5000,
                        help="training images of --dataset synthetic; the test set is a fifth of it (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="crop size in pixels (default: the dataset's own: 32 CIFAR, 96 STL-10, first image of a folder)")
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help="backbone; convnet is a 4-layer net for quick CPU checks only (default: resnet18, convnet for synthetic)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="pretraining epochs (default: 1000; synthetic: 40, or the method's own offline recipe)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per step, two views each (default: %(default)s)")
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default=None,
                        help="lars excludes biases and norm parameters from weight decay and trust scaling; "
                             "sgd (momentum 0.9) decays every parameter (default: %(default)s)")
    parser.add_argument("--base-lr", type=float, default=None,
                        help="learning rate at batch 256; the peak lr is base-lr x batch-size / 256 (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay coefficient (default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=int, default=None,
                        help="linear warm-up to the peak lr, then a cosine, per step (default: %(default)s, "
                             "at most a tenth of --epochs)")
    parser.add_argument("--final-lr-ratio", type=float, default=None,
                        help="the cosine ends at this fraction of the peak lr (default: %(default)s)")
    parser.add_argument("--augmentations", choices=AUGMENTATIONS, default=None,
                        help="named two-view recipe from the published configs, see README (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast dtype of the forward pass; losses stay fp32 (default: %(default)s = bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--pipeline", choices=("auto", "tensor", "pil"), default="auto",
                        help="tensor: images held in memory as uint8 on the training device, augmented in batches with "
                             "per-image parameters; pil: torchvision transforms in DataLoader workers; auto: tensor "
                             "when the dataset fits in memory (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (slow start, faster steps on a GPU)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=min(8, torch.get_num_threads()),
                        help="data loading processes, 0 loads in the main process (default: %(default)s, the CPU threads up to 8)")
    parser.add_argument("--seed", type=int, default=0, help="seeds python, numpy, torch and the data order (default: %(default)s)")
    parser.add_argument("--eval-every", type=positive_int, default=None,
                        help="kNN evaluation every N epochs and at the end (default: a tenth of --epochs)")
    parser.add_argument("--log-every", type=positive_int, default=50, help="progress line every N steps (default: %(default)s)")
    parser.add_argument("--out-dir", default="runs", help="parent folder of run folders (default: %(default)s)")
    parser.add_argument("--run-name", default=None, help="run folder name (default: method-dataset-arch-seed-time)")
    parser.add_argument("--ortho", choices=ORTHO_KINDS, default="none",
                        help="orthogonality regularization of the backbone's conv and linear weights (He et al., 2024): "
                             "so = soft orthogonality, srip = spectral norm of W^T W - I (default: %(default)s)")
    parser.add_argument("--ortho-weight", type=float, default=None,
                        help="weight of the --ortho penalty (default: 1e-6 for so, 1e-3 for srip, the paper's ResNet values)")
    parser.add_argument("--ortho-heads", action="store_true",
                        help="regularise the projector (and predictor) too, not only the backbone")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue from a checkpoint.pt with its stored arguments (only --device, --num-workers, "
                             "--data-dir and --log-every may change)")
    # ALGO-SPECIFIC arguments and defaults: solo-learn's CIFAR config behind 90.74% linear top-1
    parser.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature tau (default: %(default)s)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=2048, help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=256, help="projector output width (default: %(default)s)")
    parser.set_defaults(optimizer="lars", base_lr=0.4, weight_decay=1e-5, warmup_epochs=10, final_lr_ratio=0.0,
                        augmentations="symmetric")
    return finalize_args(parser, argv, METHOD)


# ALGO LOGIC: loss
def nt_xent_loss(z1, z2, temperature=0.2):
    """NT-Xent, eq. (1) of the paper, averaged over all 2N anchors:
        l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),  s = cosine similarity,
    where j is the other view of anchor i's image and the other 2N - 2 views are negatives.
    z1, z2: (N, D) projections of the two views; returns a scalar."""
    n = z1.shape[0]
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)                  # (2N, D), unit rows
    logits = z @ z.T / temperature                                            # (2N, 2N), s_ik / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))                     # drop k = i from the sum
    positive = torch.arange(2 * n, device=z.device).roll(n)                   # (2N,) j = i + N mod 2N
    positive_logits = logits.gather(1, positive[:, None]).squeeze(1)          # (2N,) s_ij / tau
    return (torch.logsumexp(logits, dim=1) - positive_logits).mean()         # log-sum-exp: stable


def main(args):
    # TRY NOT TO MODIFY: seeding, run folder, data
    seed_everything(args.seed)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    data = build_data(args)
    run_dir = prepare_run_dir(args)

    # ALGO LOGIC: model
    backbone, feature_dim = build_backbone(args.arch, data.image_size)
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_dim], batch_norm=False)  # Linear-ReLU-Linear
    model = nn.ModuleDict({"backbone": backbone, "projector": projector}).to(device)

    # TRY NOT TO MODIFY: orthogonality regularizer (--ortho), optimiser, schedule, resume
    model["ortho"] = OrthogonalityRegularizer(model, args.ortho, args.ortho_heads).to(device)
    prepare_model(model, args)                                           # channels_last on a GPU, --compile
    optimizer = build_optimizer(args.optimizer, model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start_epoch, global_step = resume(args.resume, model, optimizer, scaler) if args.resume else (0, 0)
    steps_per_epoch = len(data.train_loader)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    log = RunLogger(run_dir, args, steps_per_epoch)
    print(f"{METHOD}: {args.arch} on {args.dataset} ({data.image_size} px), {args.epochs} epochs x "
          f"{steps_per_epoch} steps, peak lr {args.lr:.3g}, run folder {run_dir}")
    print(f"--ortho {args.ortho} (weight {args.ortho_weight:g}) covers {model['ortho'].describe()}")

    for epoch in range(start_epoch, args.epochs):
        model.train()
        set_data_epoch(data, args.seed, epoch)
        for (x1, x2), _ in data.train_loader:
            x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)  # (B, 3, H, W) each
            lr = set_lr(optimizer, warmup_cosine(global_step, total_steps, warmup_steps, args.lr,
                                                 args.lr * args.final_lr_ratio))
            # ALGO LOGIC: training step
            with autocast(device, args.precision):
                h1, h2 = model["backbone"](x1), model["backbone"](x2)        # (B, feature_dim) representations
                z1, z2 = model["projector"](h1), model["projector"](h2)      # (B, proj_dim) projections
            ssl_loss = nt_xent_loss(z1.float(), z2.float(), args.temperature)
            terms = {"loss": ssl_loss}                                       # logged every --log-every steps

            # TRY NOT TO MODIFY: orthogonality penalty (0 with --ortho none), optimiser step, logging
            penalty = model["ortho"]()                                       # SO or SRIP of the weights, fp32
            loss = ssl_loss + args.ortho_weight * penalty
            if args.ortho != "none":
                terms["ortho"] = penalty
            optimizer_step(loss, optimizer, scaler)
            global_step += 1
            log.train_step(epoch, global_step, terms, lr)
        # TRY NOT TO MODIFY: checkpoint.pt every epoch, kNN every --eval-every, backbone.pt + linear probe at the end
        end_of_epoch(run_dir, model, optimizer, scaler, epoch, global_step, args, data, device, log)


if __name__ == "__main__":
    main(parse_args())
