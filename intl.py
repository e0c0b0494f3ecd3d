# INTL (Weng et al., ICLR 2024) https://arxiv.org/abs/2305.16789 — needs common.py beside it
"""Modulate Your Spectrum in Self-Supervised Learning: whiten each view's embedding by IterNorm
(Newton's iteration), align the two whitened views, and add a trace loss that pushes the whitened
embedding's eigenvalues towards one another. No negatives, no predictor, no target network.

Usage:
    python intl.py --dataset synthetic                   # offline check: convnet, 40 epochs, 2 CPU cores
    python intl.py --dataset cifar10                     # reference recipe: 1000 epochs, one GPU
    python intl.py --dataset folder --data-dir DIR       # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python intl.py --resume runs/NAME/checkpoint.pt      # continue a run where it stopped
Defaults are the authors' CIFAR-10 configuration (winci-ai/INTL) behind 92.60% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse
import math

import torch
import torch.nn as nn

from common import (
    ARCHS, AUGMENTATIONS, DATASETS, ORTHO_KINDS, OrthogonalityRegularizer, autocast, build_backbone,
    build_data, build_optimizer, effective_rank, end_of_epoch, finalize_args, optimizer_step,
    positive_int, prepare_model, prepare_run_dir, projection_mlp, resume, RunLogger, seed_everything,
    set_data_epoch, set_lr, warmup_cosine,
)

METHOD = "intl"


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
    # ALGO-SPECIFIC arguments and defaults: the authors' CIFAR-10 config behind 92.60% linear top-1
    parser.add_argument("--iters", type=positive_int, default=4, help="Newton iterations T of IterNorm (default: %(default)s)")
    parser.add_argument("--axis", type=int, choices=(0, 1), default=0,
                        help="0 whitens the N x N matrix of samples (each centred over its features), 1 the D x D "
                             "matrix of features (each centred over the batch) (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=None,
                        help="trace-loss weight (default: 0.01 (log2 N - 3) for axis 0, N the batch size; "
                             "0.01 (log2 D - 3) for axis 1, D the projector output width)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=2048, help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=2048, help="projector output width (default: %(default)s)")
    parser.set_defaults(optimizer="sgd", base_lr=0.3, weight_decay=1e-4, warmup_epochs=2, final_lr_ratio=0.001,
                        augmentations="asymmetric")
    return finalize_args(parser, argv, METHOD)


# ALGO LOGIC: loss
def iter_norm(z, iters=4, axis=0):
    """IterNorm whitening (Huang et al., CVPR 2019) as in the INTL paper and the authors' code:
    Sigma^(-1/2) by T Newton iterations, with no eps and no running statistics; gradients flow
    through Sigma and W.
        axis 0: X~ = each row of z centred over its D features,  Sigma = X~ X~^T / (D - 1)   (N, N)
        axis 1: X~ = each column centred over the batch,         Sigma = X~^T X~ / (N - 1)   (D, D)
        Sigma_N = Sigma / tr(Sigma);  P_0 = I;  P_k = 1.5 P_(k-1) - 0.5 P_(k-1)^3 Sigma_N,  k = 1..T
        W = P_T / sqrt(tr(Sigma));  output W X~ (axis 0) or X~ W (axis 1)
    Eigenvalues of Sigma_N lie in (0, 1], so P_T approaches Sigma_N^(-1/2) as T grows; at the
    paper's T = 4 the small eigenvalues are only partly stretched, which the trace loss corrects.
    Iterated far past convergence this uncoupled Newton form is numerically unstable (Higham,
    Functions of Matrices, 2008): on a covariance with condition number ~60 it converged by T = 12
    and diverged by T = 20 in float64 here. z: (N, D); returns the whitened (N, D)."""
    if axis == 0:
        x = z - z.mean(dim=1, keepdim=True)                                   # (N, D), rows centred
        sigma = x @ x.T / (x.shape[1] - 1)                                    # (N, N)
    else:
        x = z - z.mean(dim=0, keepdim=True)                                   # (N, D), columns centred
        sigma = x.T @ x / (x.shape[0] - 1)                                    # (D, D)
    trace = sigma.diagonal().sum()
    sigma_n = sigma / trace                                                   # unit trace
    p = torch.eye(sigma.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * (p @ p @ p) @ sigma_n
    w = p / trace.sqrt()
    return w @ x if axis == 0 else x @ w


def trace_loss(z_hat, axis=0):
    """Trace loss TL(Z^) = sum_k (1 - v_k)^2, v_k the unbiased variance of row k across its features
    (axis 0) or of column k across the batch (axis 1): zero when every diagonal entry of the whitened
    covariance is 1. The paper shows that, behind IterNorm, minimising it drives the covariance's
    eigenvalues towards equality. z_hat: (N, D); returns a scalar."""
    variance = z_hat.var(dim=1 if axis == 0 else 0)                          # (N,) or (D,), centred inside
    return ((1 - variance) ** 2).sum()


def intl_loss(z1, z2, iters=4, axis=0, beta=None):
    """The INTL objective: each view whitened on its own, then
        loss = (2 - 2 mean_i cos(z^1_i, z^2_i)) + beta (TL(Z^1) + TL(Z^2))
    with no stop-gradient. beta defaults to 0.01 (log2(N) - 3) for axis 0 (0.05 at batch 256) and
    0.01 (log2(D) - 3) for axis 1, the authors' rule. z1, z2: (N, D) projections;
    returns (loss, the alignment and trace terms detached for logging)."""
    n, d = z1.shape
    if beta is None:
        beta = 0.01 * (math.log2(n if axis == 0 else d) - 3)
    z_hat1, z_hat2 = iter_norm(z1, iters, axis), iter_norm(z2, iters, axis)  # (N, D) each
    cosine = (nn.functional.normalize(z_hat1, dim=1) * nn.functional.normalize(z_hat2, dim=1)).sum(dim=1)  # (N,)
    alignment = 2 - 2 * cosine.mean()
    trace = trace_loss(z_hat1, axis) + trace_loss(z_hat2, axis)
    return alignment + beta * trace, {"alignment": alignment.detach(), "trace": trace.detach()}


@torch.no_grad()
def spectrum_stats(z, iters=4, axis=0):
    """What IterNorm and the trace loss do to the spectrum, for the progress line: the effective
    rank (exp of the entropy of the normalised eigenvalues, as in RankMe) of the covariance of the
    projector output z and of its whitened version, on the whitening axis. Equal eigenvalues give
    the full rank: min(N, D - 1) for axis 0, min(N - 1, D) for axis 1. The eigenvalues are the
    squared singular values of the centred matrix, in float64. A host sync: call it at log steps."""
    stats = {}
    for name, values in (("z", z), ("zhat", iter_norm(z, iters, axis))):
        if torch.isfinite(values).all():  # else the loss is not finite either, and the logger stops the run
            x = values.double() - values.double().mean(dim=1 if axis == 0 else 0, keepdim=True)
            stats[f"{name}_erank"] = effective_rank(torch.linalg.svdvals(x) ** 2)
    return stats


def main(args):
    # TRY NOT TO MODIFY: seeding, run folder, data
    seed_everything(args.seed)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    data = build_data(args)
    run_dir = prepare_run_dir(args)

    # ALGO LOGIC: model
    backbone, feature_dim = build_backbone(args.arch, data.image_size)
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_hidden_dim, args.proj_dim],
                               hidden_bias=False)  # [Linear(no bias)-BN-ReLU] x 2, Linear with bias
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
            ssl_loss, loss_terms = intl_loss(z1.float(), z2.float(), args.iters, args.axis, args.beta)  # whitening in fp32
            terms = {"loss": ssl_loss, **loss_terms}                         # logged every --log-every steps
            if log.due(global_step + 1):                                         # watch the spectrum being modulated
                terms.update(spectrum_stats(z1.float(), args.iters, args.axis))

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
