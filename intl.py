# INTL (Weng et al., ICLR 2024) https://arxiv.org/abs/2305.16789 — needs common.py beside it
"""Modulate Your Spectrum in Self-Supervised Learning: whiten each view's embedding by IterNorm
(Newton's iteration), align the two whitened views, and add a trace loss that pushes the whitened
embedding's eigenvalues towards one another. No negatives, no predictor, no target network.

Usage:
    python intl.py --dataset synthetic                   # offline check: convnet, 40 epochs, 2 CPU cores
    python intl.py --dataset cifar10                     # reference recipe: 1000 epochs, one GPU
    python intl.py --dataset folder --data-dir DIR       # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python intl.py --resume runs/NAME/checkpoint.pt      # continue a run where it stopped
    torchrun --standalone --nproc_per_node 8 intl.py --dataset cifar10   # 8 GPUs: one GPU's steps (README)
Defaults are the authors' CIFAR-10 configuration (winci-ai/INTL) behind 92.60% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse
import math

import torch
import torch.nn as nn

from common import (
    Bounded, OrthogonalityRegularizer, Run, add_common_args, add_recipe_args, autocast, build_backbone, build_data,
    build_optimizer, claim_run_folder, effective_rank, epoch_batches, evaluate, gather, online_probe_loss,
    optimizer_step, parse_run_args, positive_int, prepare_model, projection_mlp, resume, seed_everything, set_lr,
    start_processes, stop_safely, sync_batch_norm, warmup_cosine,
)

METHOD = "intl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ALGO-SPECIFIC: the recipe, the authors' CIFAR-10 config behind 92.60% (winci-ai/INTL scripts/cifar10.sh)
    add_recipe_args(parser, epochs=1000, batch_size=256, optimizer="sgd", base_lr=0.3, weight_decay=1e-4,
                    warmup_epochs=2, final_lr_ratio=0.001, augmentations="asymmetric",
                    probe_lr=0.1)
    parser.add_argument("--iters", type=positive_int, default=4,
                        help="Newton iterations T of IterNorm (default: %(default)s)")
    parser.add_argument("--axis", type=int, choices=(0, 1), default=0,
                        help="0 whitens the N x N matrix of samples (each centred over its features), 1 the D x D "
                             "matrix of features (each centred over the batch) (default: %(default)s)")
    parser.add_argument("--beta", type=Bounded(float, ge=0), default=None,
                        help="trace-loss weight (default: 0.01 (log2 N - 3) for axis 0, N the batch size; "
                             "0.01 (log2 D - 3) for axis 1, D the projector output width)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=2048,
                        help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=2048,
                        help="projector output width (default: %(default)s)")
    # The offline check (--dataset synthetic): the 4-layer convnet for 40 epochs (at 20, learning had often
    # not started before the learning rate decayed); flags given on the command line still win
    offline_check = dict(arch="convnet", epochs=40)
    # TRY NOT TO MODIFY: the infrastructure flags every method shares, then parsing and checks
    add_common_args(parser)
    return parse_run_args(parser, argv, METHOD, offline_check)


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
    returns (loss, the alignment and trace terms detached for logging). Under torchrun, as the
    authors' code, IterNorm whitens the global batch (gathered from every process, gradients flowing
    back: common.gather) and N in beta is the global batch."""
    z1, z2 = gather(z1), gather(z2)                                           # (N, D) each, all processes
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
    # TRY NOT TO MODIFY: processes (torchrun starts N, python one), run folder, seeding, data
    rank, args.world_size = start_processes(args.device, args.batch_size)  # (0, 1) without torchrun
    is_main = rank == 0                                                  # this process saves, logs and evaluates
    run_dir = claim_run_folder(args, is_main)                            # a new folder (never reused), or resumed
    seed_everything(args.seed, args.deterministic)   # the same initial weights everywhere; cuDNN's fastest kernels
    device = torch.device(args.device)
    data = build_data(args, rank, args.world_size)                       # this process's share of each batch
    args.image_size, args.pipeline = data.image_size, data.pipeline      # what auto chose, stored with the run

    # ALGO LOGIC: model
    backbone, feature_dim = build_backbone(args.arch, data.image_size)
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_hidden_dim, args.proj_dim],
                               hidden_bias=False)  # [Linear(no bias)-BN-ReLU] x 2, Linear with bias
    model = nn.ModuleDict({"backbone": backbone, "projector": projector}).to(device)

    # TRY NOT TO MODIFY: orthogonality regularizer (--ortho), optimiser, schedule, resume, the run's records
    model["online_probe"] = nn.Linear(feature_dim, data.num_classes).to(device)  # solo-learn's online classifier
    model["ortho"] = OrthogonalityRegularizer(model, args.ortho, args.ortho_heads).to(device)
    if args.world_size > 1:  # BatchNorm statistics of the global batch, as one process's (google-research/simclr#114)
        sync_batch_norm(model)
    prepare_model(model, device, args.compile)                          # channels_last on a GPU, --compile
    peak_lr = args.base_lr * args.batch_size / 256                      # the linear scaling rule
    optimizer = build_optimizer(args.optimizer, model, peak_lr, args.weight_decay, args.probe_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start_epoch, global_step = resume(args.resume, model, optimizer, scaler) if args.resume else (0, 0)
    steps_per_epoch = len(data.train_loader)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    run = Run(args, run_dir, is_main, model, optimizer, scaler, data, device)  # metrics.jsonl, checkpoints, stops
    print(f"{METHOD}: {args.arch} on {args.dataset} ({data.image_size} px), {args.epochs} epochs x "
          f"{steps_per_epoch} steps, peak lr {peak_lr:.3g}, run folder {run_dir}")
    print(f"--ortho {args.ortho} (weight {args.ortho_weight:g}) covers {model['ortho'].describe()}")

    with stop_safely(run):                          # SIGINT, SIGTERM: a checkpoint at the step; errors: common.py
        if global_step == 0 and is_main:                                # the untrained backbone, logged as epoch 0
            run.evaluation(-1, 0, evaluate(model, data, device))
        for epoch in range(start_epoch, args.epochs):
            model.train()
            for views, labels in epoch_batches(data.train_loader, args.seed, epoch, global_step):  # mid-epoch too
                views = [x.to(device, non_blocking=True) for x in views]         # [(B, 3, H, W)] x 2 (multi-crop: more)
                labels = labels.to(device, non_blocking=True)                    # (B,), -1 where unlabelled
                lr = set_lr(optimizer, warmup_cosine(global_step, total_steps, warmup_steps, peak_lr,
                                                     peak_lr * args.final_lr_ratio))
                # ALGO LOGIC: training step
                x1, x2 = views                                                   # (B, 3, H, W) each
                with autocast(device, args.precision):
                    h1, h2 = model["backbone"](x1), model["backbone"](x2)        # (B, feature_dim) representations
                    z1, z2 = model["projector"](h1), model["projector"](h2)      # (B, proj_dim) projections
                ssl_loss, loss_terms = intl_loss(
                    z1.float(), z2.float(), args.iters, args.axis, args.beta
                )  # whitening in fp32
                terms = {"loss": ssl_loss, **loss_terms}                         # logged every --log-every steps
                if run.log_due(global_step + 1):                                     # watch the spectrum being modulated
                    terms.update(spectrum_stats(gather(z1.float()), args.iters, args.axis))  # the global batch

                # TRY NOT TO MODIFY: online probe (detached features), orthogonality penalty, optimiser step, logging
                probe_loss = online_probe_loss(model["online_probe"], (h1, h2), labels)  # no gradient to the backbone
                penalty = model["ortho"]()                                       # SO or SRIP of the weights, fp32
                loss = ssl_loss + args.ortho_weight * penalty + probe_loss
                terms["probe"] = probe_loss
                if args.ortho != "none":
                    terms["ortho"] = penalty
                optimizer_step(loss, optimizer, scaler)
                global_step += 1
                run.train_step(epoch, global_step, terms, lr)
                # TRY NOT TO MODIFY: SIGINT/SIGTERM stop after a whole step; checkpoint.pt every epoch, backbone.pt last
                run.stop_if_signalled(epoch, global_step)                    # a checkpoint at this step, exit 130/143
            run.end_of_epoch(epoch, global_step)                             # kNN every --eval-every, linear probe last


if __name__ == "__main__":
    main(parse_args())
