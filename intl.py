# INTL (Weng et al., ICLR 2024) https://arxiv.org/abs/2305.16789 — needs common.py beside it
"""Modulate Your Spectrum in Self-Supervised Learning: whiten each view's embedding by IterNorm
(Newton's iteration), align the two whitened views, and add a trace loss that pushes the whitened
embedding's eigenvalues towards one another. No negatives, no predictor; with --ema (the authors' ImageNet
intl_m) an EMA target network whitens one view for the others, and multi-crop adds four smaller views.

Usage:
    python intl.py --dataset synthetic                   # offline check: convnet, 40 epochs, 2 CPU cores
    python intl.py --dataset cifar10                     # reference recipe: 1000 epochs, one GPU
    python intl.py --dataset folder --data-dir DIR       # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python intl.py --recipe imagenet --data-dir IMAGENET # ResNet-50, multi-crop, EMA, 800 epochs: 76.6% (authors')
    python intl.py --recipe imagenet100 --data-dir IN100 # ResNet-18, 2 x 224 views, 400 epochs: 81.68% (authors')
    python intl.py --resume runs/NAME/checkpoint.pt      # continue a run where it stopped
    torchrun --standalone --nproc_per_node 8 intl.py --dataset cifar10   # 8 GPUs: one GPU's steps (README)
Defaults are the authors' CIFAR-10 configuration (winci-ai/INTL) behind 92.60% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse
import copy
import math

import torch
import torch.nn as nn

from common import (
    Bounded, OrthogonalityRegularizer, Run, add_common_args, add_recipe_args, autocast, build_backbone, build_data,
    build_optimizer, claim_run_folder, effective_rank, ema_momentum, ema_update, epoch_batches, evaluate, gather,
    online_probe_loss, optimizer_step, parse_run_args, positive_int, prepare_model, projection_mlp, resume,
    seed_everything, set_lr, start_processes, stop_safely, sync_batch_norm, warmup_cosine,
)

METHOD = "intl"

# ALGO-SPECIFIC: the recipes, one per published setting (--recipe NAME; each lists what differs from the first, the
# default), from winci-ai/INTL 0aa69af (scripts/*.sh, main.py, cfg.py defaults; numbers in its README)
RECIPES = {
    # scripts/cifar10.sh: behind 92.60% (INTL probe), ResNet-18; cifar/main.py decays every parameter
    "cifar": dict(epochs=1000, batch_size=256, optimizer="sgd", base_lr=0.3, weight_decay=1e-4, warmup_epochs=2,
                  final_lr_ratio=0.001, augmentations="asymmetric", probe_lr=0.1),
    # scripts/in100.sh: behind 81.68% top-1 / 73.46% 5-NN; 2 x 224 views, no EMA; main.py: no decay on ndim-1 params
    "imagenet100": dict(dataset="folder", arch="resnet18", epochs=400, batch_size=128, optimizer="sgd-norms-excluded",
                        base_lr=0.5, weight_decay=2.5e-5, proj_hidden_dim=4096, proj_dim=8192),
    # scripts/ep800_multi-crop_ema.sh (--method intl_m --multi-crop): behind 76.6% top-1; zero-init residual for
    # ResNet-50 (src/model.py); 100/200/400 epochs at lr 0.5/0.4/0.4: 73.5/75.2/76.1%
    "imagenet": dict(dataset="folder", arch="resnet50", zero_init_residual=True, epochs=800, batch_size=256,
                     optimizer="sgd-norms-excluded", base_lr=0.3, weight_decay=1e-5, augmentations="multicrop",
                     proj_hidden_dim=8192, proj_dim=8192, ema=True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(parser, RECIPES)  # --recipe, then --epochs ... --probe-lr: the recipe's values
    # ALGO-SPECIFIC: the method's own flags, the first recipe's values as their defaults
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
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                        help="the authors' intl_m: view 0 through an EMA target of backbone and projector only, every "
                             "other view against it; --no-ema: every view i >= 1 against view 0 (default: off)")
    parser.add_argument("--ema-base", type=Bounded(float, ge=0, le=1), default=0.996,
                        help="EMA momentum at step 0, rising to 1 on a cosine (cfg.py --m) (default: %(default)s)")
    # The offline check (--dataset synthetic): the 4-layer convnet for 40 epochs (at 20, learning had often
    # not started before the learning rate decayed); flags given on the command line still win
    offline_check = dict(arch="convnet", epochs=40)
    # TRY NOT TO MODIFY: the infrastructure flags every method shares, then parsing and checks
    add_common_args(parser)
    return parse_run_args(parser, argv, METHOD, RECIPES, offline_check)


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


def trace_weight(n, d, axis=0):
    """The authors' beta, the trace loss's weight: 0.01 (log2(N) - 3) for axis 0 (0.05 at batch 256), 0.01 (log2(D) - 3)
    for axis 1; N, D: the (global) batch and the embedding's width."""
    return 0.01 * (math.log2(n if axis == 0 else d) - 3)


def intl_loss(z1, z2, iters=4, axis=0, beta=None):
    """The INTL objective: each view whitened on its own, then
        loss = (2 - 2 mean_i cos(z^1_i, z^2_i)) + beta (TL(Z^1) + TL(Z^2))
    with no stop-gradient. beta defaults to the authors' rule (trace_weight). z1, z2: (N, D) projections;
    returns (loss, the alignment and trace terms detached for logging). Under torchrun, as the
    authors' code, IterNorm whitens the global batch (gathered from every process, gradients flowing
    back: common.gather) and N in beta is the global batch."""
    z1, z2 = gather(z1), gather(z2)                                           # (N, D) each, all processes
    beta = trace_weight(*z1.shape, axis) if beta is None else beta
    z_hat1, z_hat2 = iter_norm(z1, iters, axis), iter_norm(z2, iters, axis)  # (N, D) each
    cosine = (nn.functional.normalize(z_hat1, dim=1) * nn.functional.normalize(z_hat2, dim=1)).sum(dim=1)  # (N,)
    alignment = 2 - 2 * cosine.mean()
    trace = trace_loss(z_hat1, axis) + trace_loss(z_hat2, axis)
    return alignment + beta * trace, {"alignment": alignment.detach(), "trace": trace.detach()}


def multi_view_intl_loss(zs, iters=4, axis=0, beta=None, z_target=None):
    """INTL over two views or more (multi-crop), each view whitened on its own, as the authors' methods/intl.py
    and methods/intl_m.py pair them:
        z_target None: every view i >= 1 against view 0, both with gradient; with V views
            loss = 1/(V-1) sum_{i>=1} [(2 - 2 mean cos(z^_i, z^_0)) + beta (TL(Z^_i) + TL(Z^_0))]
        z_target, the EMA target's projection of view 0 (--ema, intl_m): every view in zs against it, whitened
        too, its trace loss not counted: loss = mean_i [(2 - 2 mean cos(z^_i, z^_target)) + beta TL(Z^_i)]
    Two views without a target: intl_loss. zs: [(N, D)]; returns (loss, mean alignment and trace, detached)."""
    zs = [gather(z) for z in zs]                                              # [(N, D)], all processes
    beta = trace_weight(*zs[0].shape, axis) if beta is None else beta
    z_hats = [iter_norm(z, iters, axis) for z in zs]                          # [(N, D)]
    if z_target is None:
        anchor, others, anchor_trace = z_hats[0], z_hats[1:], trace_loss(z_hats[0], axis)
    else:
        anchor, others, anchor_trace = iter_norm(gather(z_target), iters, axis), z_hats, 0.0
    unit = nn.functional.normalize
    alignment = torch.stack([2 - 2 * (unit(z_hat, dim=1) * unit(anchor, dim=1)).sum(dim=1).mean() for z_hat in others])
    trace = torch.stack([trace_loss(z_hat, axis) + anchor_trace for z_hat in others])
    return (alignment + beta * trace).mean(), {"alignment": alignment.mean().detach(), "trace": trace.mean().detach()}


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
    backbone, feature_dim = build_backbone(args.arch, data.image_size, args.zero_init_residual)
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_hidden_dim, args.proj_dim],
                               hidden_bias=False)  # [Linear(no bias)-BN-ReLU] x 2, Linear with bias
    online = nn.ModuleDict({"backbone": backbone, "projector": projector})
    model = nn.ModuleDict({**online, "target": copy.deepcopy(online).requires_grad_(False)} if args.ema else online)
    model = model.to(device)  # one state dict for checkpoints; moves online (and its target) in place

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
                online_views = views[1:] if args.ema else views                  # --ema: view 0 is the target's
                with autocast(device, args.precision):
                    hs = [model["backbone"](x) for x in online_views]            # [(B, feature_dim)] representations
                    zs = [model["projector"](h) for h in hs]                     # [(B, proj_dim)] projections
                    with torch.no_grad():                                         # the target gets no gradient
                        z_target = model["target"]["projector"](model["target"]["backbone"](views[0])) \
                            if args.ema else None                                # (B, proj_dim)
                if len(views) == 2 and not args.ema:  # whitening in fp32
                    ssl_loss, loss_terms = intl_loss(zs[0].float(), zs[1].float(), args.iters, args.axis, args.beta)
                else:
                    target = None if z_target is None else z_target.float()
                    ssl_loss, loss_terms = multi_view_intl_loss([z.float() for z in zs], args.iters, args.axis,
                                                                args.beta, target)
                terms = {"loss": ssl_loss, **loss_terms}                         # logged every --log-every steps
                if args.ema:
                    terms["ema_m"] = ema_momentum(global_step, total_steps, args.ema_base)  # --ema-base -> 1
                if run.log_due(global_step + 1):                                 # watch the spectrum being modulated
                    terms.update(spectrum_stats(gather(zs[0].float()), args.iters, args.axis))  # the global batch
                h1, h2 = hs[0], hs[1 % len(hs)]                                  # the online probe's two views

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
                # ALGO LOGIC: after each optimiser step the EMA target (--ema) moves towards the online network
                if args.ema:
                    ema_update(model["target"], online, terms["ema_m"])
                # TRY NOT TO MODIFY: SIGINT/SIGTERM stop after a whole step; checkpoint.pt every epoch, backbone.pt last
                run.stop_if_signalled(epoch, global_step)                    # a checkpoint at this step, exit 130/143
            run.end_of_epoch(epoch, global_step)                             # kNN every --eval-every, linear probe last


if __name__ == "__main__":
    main(parse_args())
