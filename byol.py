# BYOL (Grill et al., NeurIPS 2020) https://arxiv.org/abs/2006.07733 — needs common.py beside it
"""Predict a slowly moving target network's projection of one view from the other view (no negatives).

Usage:
    python byol.py --dataset synthetic                   # offline check: convnet, SGD, 80 epochs, 2 CPU cores
    python byol.py --dataset cifar10                     # reference recipe: 1000 epochs, one GPU
    python byol.py --dataset folder --data-dir DIR       # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python byol.py --resume runs/NAME/checkpoint.pt      # continue a run where it stopped
Defaults are solo-learn's CIFAR configuration behind 92.58% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse
import copy
import math

import torch
import torch.nn as nn

from common import (
    ARCHS, AUGMENTATIONS, DATASETS, ORTHO_KINDS, OrthogonalityRegularizer, autocast, build_backbone,
    build_data, build_optimizer, end_of_epoch, finalize_args, optimizer_step, positive_int,
    prepare_model, prepare_run_dir, projection_mlp, resume, RunLogger, seed_everything, set_data_epoch, set_lr,
    warmup_cosine,
)

METHOD = "byol"


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
    # ALGO-SPECIFIC arguments and defaults: solo-learn's CIFAR config behind 92.58% linear top-1
    parser.add_argument("--tau-base", type=float, default=0.99,
                        help="EMA rate of the target at step 0; it rises to 1 on a cosine (default: %(default)s)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=4096, help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=256, help="projector output width (default: %(default)s)")
    parser.add_argument("--pred-hidden-dim", type=positive_int, default=4096, help="predictor hidden width (default: %(default)s)")
    parser.set_defaults(optimizer="lars", base_lr=1.0, weight_decay=1e-5, warmup_epochs=10, final_lr_ratio=0.0,
                        augmentations="asymmetric")
    # The offline check (--dataset synthetic) uses SGD for 80 epochs: with the LARS recipe above BYOL
    # learns there only after 1,500+ steps (README, BYOL deviation 5), more than a CPU check can afford.
    parser.set_defaults(synthetic_recipe=dict(optimizer="sgd", base_lr=0.05, weight_decay=5e-4, epochs=80))
    return finalize_args(parser, argv, METHOD)


# ALGO LOGIC: loss
def byol_loss(p, z):
    """Eq. (2) of the paper, one direction: the squared distance of the L2-normalised prediction
    and target projection, ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), averaged over the batch.
    The target z is a constant (stop-gradient). p, z: (N, D); returns a scalar in [0, 4]."""
    cosine = (nn.functional.normalize(p, dim=1) * nn.functional.normalize(z.detach(), dim=1)).sum(dim=1)  # (N,)
    return (2 - 2 * cosine).mean()


# ALGO LOGIC: target network
def target_tau(step, total_steps, tau_base=0.99):
    """EMA rate after optimiser step `step` (from 0), section 3.3 of the paper:
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from tau_base at k = 0 to 1 at k = K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target, online, tau):
    """target <- tau * target + (1 - tau) * online, parameter by parameter (eq. 1 of the paper).
    Only parameters are averaged: BatchNorm running statistics are buffers, and the target keeps
    its own, updated from the batches it sees in train mode (it normalises with batch statistics
    during training, as in the reference code)."""
    for target_param, online_param in zip(target.parameters(), online.parameters()):
        target_param.lerp_(online_param, 1 - tau)


def main(args):
    # TRY NOT TO MODIFY: seeding, run folder, data
    seed_everything(args.seed)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    data = build_data(args)
    run_dir = prepare_run_dir(args)

    # ALGO LOGIC: model
    backbone, feature_dim = build_backbone(args.arch, data.image_size)
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_dim])   # Linear-BN-ReLU-Linear
    predictor = projection_mlp([args.proj_dim, args.pred_hidden_dim, args.proj_dim])  # same shape
    online = nn.ModuleDict({"backbone": backbone, "projector": projector})
    target = copy.deepcopy(online).requires_grad_(False)  # starts equal to online; moved by ema_update only
    model = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor,
                           "target": target}).to(device)  # one state dict for checkpoints; moves online in place

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
                p1, p2 = model["predictor"](z1), model["predictor"](z2)      # (B, proj_dim) predictions
                with torch.no_grad():                                         # the target gets no gradient
                    target_z1 = target["projector"](target["backbone"](x1))   # (B, proj_dim)
                    target_z2 = target["projector"](target["backbone"](x2))
            # symmetrised: each view's prediction regresses the other view's target, range [0, 8]
            ssl_loss = byol_loss(p1.float(), target_z2.float()) + byol_loss(p2.float(), target_z1.float())
            tau = target_tau(global_step, total_steps, args.tau_base)
            terms = {"loss": ssl_loss, "tau": tau}                           # logged every --log-every steps

            # TRY NOT TO MODIFY: orthogonality penalty (0 with --ortho none), optimiser step, logging
            penalty = model["ortho"]()                                       # SO or SRIP of the weights, fp32
            loss = ssl_loss + args.ortho_weight * penalty
            if args.ortho != "none":
                terms["ortho"] = penalty
            optimizer_step(loss, optimizer, scaler)
            global_step += 1
            log.train_step(epoch, global_step, terms, lr)
            # ALGO LOGIC: after each optimiser step the target moves towards the online network
            ema_update(target, online, tau)
        # TRY NOT TO MODIFY: checkpoint.pt every epoch, kNN every --eval-every, backbone.pt + linear probe at the end
        end_of_epoch(run_dir, model, optimizer, scaler, epoch, global_step, args, data, device, log)


if __name__ == "__main__":
    main(parse_args())
