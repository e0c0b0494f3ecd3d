# VICReg (Bardes, Ponce, LeCun, ICLR 2022) https://arxiv.org/abs/2105.04906 — needs common.py beside it
"""Make two views' embeddings equal (invariance) while keeping every dimension's variance up (variance)
and the dimensions decorrelated (covariance): no negatives, no target network.

Usage:
    python vicreg.py --dataset synthetic                 # offline check: convnet, 40 epochs, 2 CPU cores
    python vicreg.py --dataset cifar10                   # reference recipe: 1000 epochs, one GPU
    python vicreg.py --dataset folder --data-dir DIR     # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python vicreg.py --recipe imagenet100 --data-dir IN100  # ResNet-18, 400 epochs: 79.22% online (solo-learn)
    python vicreg.py --resume runs/NAME/checkpoint.pt    # continue a run where it stopped
    torchrun --standalone --nproc_per_node 8 vicreg.py --dataset cifar10   # 8 GPUs: one GPU's steps (README)
Defaults are solo-learn's CIFAR configuration behind 92.07% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse

import torch
import torch.nn as nn

from common import (
    Bounded, OrthogonalityRegularizer, Run, add_common_args, add_recipe_args, autocast, build_backbone, build_data,
    build_optimizer, claim_run_folder, epoch_batches, evaluate, gather, online_probe_loss, optimizer_step,
    parse_run_args, positive_int, prepare_model, projection_mlp, resume, seed_everything, set_lr, start_processes,
    stop_safely, sync_batch_norm, warmup_cosine,
)

METHOD = "vicreg"
# ALGO-SPECIFIC: the recipes, one per published setting (--recipe NAME; each lists what differs from the first, the
# default), from solo-learn fca55e3, the commit that posted its tables (bash_files/pretrain/*/vicreg.sh, solo/args)
RECIPES = {
    # cifar/vicreg.sh: behind 92.07% (online probe), ResNet-18; probe lr 0.3: no --classifier_lr, base.py's default
    "cifar": dict(epochs=1000, batch_size=256, optimizer="lars", base_lr=0.3, weight_decay=1e-4, warmup_epochs=10,
                  final_lr_ratio=0.0, augmentations="vicreg", probe_lr=0.3),
    # imagenet-100/vicreg.sh: behind 79.22% online / 79.40% offline; batch 128 x 2 GPUs
    "imagenet100": dict(dataset="folder", arch="resnet18", epochs=400),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(parser, RECIPES)  # --recipe, then --epochs ... --probe-lr: the recipe's values
    # ALGO-SPECIFIC: the method's own flags, the first recipe's values as their defaults
    parser.add_argument("--sim-coeff", type=Bounded(float, ge=0), default=25.0,
                        help="invariance weight lambda (default: %(default)s)")
    parser.add_argument("--std-coeff", type=Bounded(float, ge=0), default=25.0,
                        help="variance weight mu of eq. (6); 12.5 is the official code's halved form (default: 25.0)")
    parser.add_argument("--cov-coeff", type=Bounded(float, ge=0), default=1.0,
                        help="covariance weight nu (default: %(default)s)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=2048,
                        help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=2048,
                        help="projector output width (default: %(default)s)")
    # The offline check (--dataset synthetic): the 4-layer convnet for 40 epochs (at 20, learning had often
    # not started before the learning rate decayed), without the recipe's blur, which at 32 px erases the
    # synthetic textures (RESULTS.md §12); flags given on the command line still win
    offline_check = dict(arch="convnet", epochs=40, blur_p=0.0)
    # TRY NOT TO MODIFY: the infrastructure flags every method shares, then parsing and checks
    add_common_args(parser)
    return parse_run_args(parser, argv, METHOD, RECIPES, offline_check)


# ALGO LOGIC: loss
def off_diagonal_squared_sum(matrix):
    """Sum of the squared off-diagonal entries of a square matrix, as all entries minus the
    diagonal: no boolean-mask indexing, so no host sync on a GPU."""
    return matrix.pow(2).sum() - matrix.diagonal().pow(2).sum()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """Eq. (6) of the paper, term by term:
        invariance s(Z, Z') = mean_ij (z1_ij - z2_ij)^2                eq. (5), also averaged over D
        variance   v(Z)     = mean_j relu(1 - sqrt(Var(z_j) + 1e-4))    eqs. (1)-(2), unbiased Var, gamma = 1
        covariance c(Z)     = sum_{i != j} C(Z)_ij^2 / D,  C(Z) = centred Z^T Z / (N - 1)   eqs. (3)-(4)
        loss = sim_coeff * s + std_coeff * (v(Z) + v(Z')) + cov_coeff * (c(Z) + c(Z'))      eq. (6)
    as solo-learn's CIFAR recipe trains it (fca55e3 solo/losses/vicreg.py). The official ImageNet code
    (facebookresearch/vicreg 4e12602 main_vicreg.py) halves the variance sum: std_coeff / 2 (12.5 for
    its 25) gives exactly its loss. z1, z2: (N, D) projections; returns (loss, the three unweighted
    terms detached for logging). Under torchrun, as the official code: variance and covariance over the
    global batch (gathered, gradients flow back: common.gather), the invariance over this process's
    images (a mean: averaged over the processes, that of the global batch)."""
    invariance = nn.functional.mse_loss(z1, z2)
    z1, z2 = gather(z1), gather(z2)                                           # (N, D) each, all processes
    n, d = z1.shape
    z1, z2 = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)                        # (N, D) centred over the batch
    std1, std2 = torch.sqrt(z1.var(dim=0) + 1e-4), torch.sqrt(z2.var(dim=0) + 1e-4)  # (D,)
    variance = torch.relu(1 - std1).mean() + torch.relu(1 - std2).mean()
    cov1, cov2 = z1.T @ z1 / (n - 1), z2.T @ z2 / (n - 1)                     # (D, D)
    covariance = off_diagonal_squared_sum(cov1) / d + off_diagonal_squared_sum(cov2) / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}


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
    projector = projection_mlp(
        [feature_dim, args.proj_hidden_dim, args.proj_hidden_dim, args.proj_dim]
    )  # [Linear-BN-ReLU] x 2, Linear
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
                ssl_loss, loss_terms = vicreg_loss(z1.float(), z2.float(), args.sim_coeff, args.std_coeff,
                                                   args.cov_coeff)
                terms = {"loss": ssl_loss, **loss_terms}                         # logged every --log-every steps

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
