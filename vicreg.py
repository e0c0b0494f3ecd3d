# VICReg (Bardes, Ponce, LeCun, ICLR 2022) https://arxiv.org/abs/2105.04906 — needs common.py beside it
"""Make two views' embeddings equal (invariance) while keeping every dimension's variance up (variance)
and the dimensions decorrelated (covariance): no negatives, no target network.

Usage:
    python vicreg.py --dataset synthetic                 # offline check: convnet, 40 epochs, 2 CPU cores
    python vicreg.py --dataset cifar10                   # reference recipe: 1000 epochs, one GPU
    python vicreg.py --dataset folder --data-dir DIR     # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python vicreg.py --resume runs/NAME/checkpoint.pt    # continue a run where it stopped
Defaults are solo-learn's CIFAR configuration behind 92.07% linear top-1 (ResNet-18, 1000 epochs).
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

METHOD = "vicreg"


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
    # ALGO-SPECIFIC arguments and defaults: solo-learn's CIFAR config behind 92.07% linear top-1
    parser.add_argument("--sim-coeff", type=float, default=25.0, help="invariance weight lambda (default: %(default)s)")
    parser.add_argument("--std-coeff", type=float, default=25.0, help="variance weight mu (default: %(default)s)")
    parser.add_argument("--cov-coeff", type=float, default=1.0, help="covariance weight nu (default: %(default)s)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=2048, help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=2048, help="projector output width (default: %(default)s)")
    parser.set_defaults(optimizer="lars", base_lr=0.3, weight_decay=1e-4, warmup_epochs=10, final_lr_ratio=0.0,
                        augmentations="vicreg")
    return finalize_args(parser, argv, METHOD)


# ALGO LOGIC: loss
def off_diagonal_squared_sum(matrix):
    """Sum of the squared off-diagonal entries of a square matrix, as all entries minus the
    diagonal: no boolean-mask indexing, so no host sync on a GPU."""
    return matrix.pow(2).sum() - matrix.diagonal().pow(2).sum()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """Eq. (6) of the paper, term by term as in the official code (facebookresearch/vicreg):
        invariance s(Z, Z') = mean_ij (z1_ij - z2_ij)^2                eq. (5), also averaged over D
        variance   v(Z)     = mean_j relu(1 - sqrt(Var(z_j) + 1e-4))    eqs. (1)-(2), unbiased Var, gamma = 1
        covariance c(Z)     = sum_{i != j} C(Z)_ij^2 / D,  C(Z) = centred Z^T Z / (N - 1)   eqs. (3)-(4)
        loss = sim_coeff * s + std_coeff * (v(Z) + v(Z')) / 2 + cov_coeff * (c(Z) + c(Z'))
    The official code halves the variance sum, eq. (6) does not; solo-learn does not either (its
    variance term is twice ours at the same std_coeff).
    z1, z2: (N, D) projections; returns (loss, the three unweighted terms detached for logging)."""
    n, d = z1.shape
    invariance = nn.functional.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)                        # (N, D) centred over the batch
    std1, std2 = torch.sqrt(z1.var(dim=0) + 1e-4), torch.sqrt(z2.var(dim=0) + 1e-4)  # (D,)
    variance = torch.relu(1 - std1).mean() / 2 + torch.relu(1 - std2).mean() / 2
    cov1, cov2 = z1.T @ z1 / (n - 1), z2.T @ z2 / (n - 1)                     # (D, D)
    covariance = off_diagonal_squared_sum(cov1) / d + off_diagonal_squared_sum(cov2) / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}


def main(args):
    # TRY NOT TO MODIFY: seeding, run folder, data
    seed_everything(args.seed)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    data = build_data(args)
    run_dir = prepare_run_dir(args)

    # ALGO LOGIC: model
    backbone, feature_dim = build_backbone(args.arch, data.image_size)
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_hidden_dim, args.proj_dim])  # [Linear-BN-ReLU] x 2, Linear
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
            ssl_loss, loss_terms = vicreg_loss(z1.float(), z2.float(), args.sim_coeff, args.std_coeff, args.cov_coeff)
            terms = {"loss": ssl_loss, **loss_terms}                         # logged every --log-every steps

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
