# BYOL (Grill et al., NeurIPS 2020) https://arxiv.org/abs/2006.07733 — needs common.py beside it
"""Predict a slowly moving target network's projection of one view from the other view (no negatives).

Usage:
    python byol.py --dataset synthetic                   # offline check: convnet, SGD, 80 epochs, 2 CPU cores
    python byol.py --dataset cifar10                     # reference recipe: 1000 epochs, one GPU
    python byol.py --dataset folder --data-dir DIR       # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python byol.py --recipe imagenet100 --data-dir IN100    # ResNet-18, 400 epochs: 79.76% online (solo-learn)
    python byol.py --resume runs/NAME/checkpoint.pt      # continue a run where it stopped
    torchrun --standalone --nproc_per_node 8 byol.py --dataset cifar10   # 8 GPUs: one GPU's steps (README)
Defaults are solo-learn's CIFAR configuration behind 92.58% linear top-1 (ResNet-18, 1000 epochs).
"""
import argparse
import copy

import torch
import torch.nn as nn

from common import (
    Bounded, OrthogonalityRegularizer, Run, add_common_args, add_recipe_args, autocast, build_backbone, build_data,
    build_optimizer, claim_run_folder, ema_momentum, ema_update, epoch_batches, evaluate, online_probe_loss,
    optimizer_step, parse_run_args, positive_int, prepare_model, projection_mlp, resume, seed_everything, set_lr,
    start_processes, stop_safely, sync_batch_norm, warmup_cosine,
)

METHOD = "byol"
# ALGO-SPECIFIC: the recipes, one per published setting (--recipe NAME; each lists what differs from the first, the
# default), from solo-learn fca55e3, the commit that posted its tables (bash_files/pretrain/*/byol.sh, solo/args)
RECIPES = {
    # cifar/byol.sh: behind 92.58% (online probe), ResNet-18
    "cifar": dict(epochs=1000, batch_size=256, optimizer="lars", base_lr=1.0, weight_decay=1e-5, warmup_epochs=10,
                  final_lr_ratio=0.0, augmentations="asymmetric", probe_lr=0.1),
    # imagenet-100/byol.sh: behind 79.76% online / 80.16% offline; batch 128 x 2 GPUs
    "imagenet100": dict(dataset="folder", arch="resnet18", epochs=400, pred_hidden_dim=8192),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(parser, RECIPES)  # --recipe, then --epochs ... --probe-lr: the recipe's values
    # ALGO-SPECIFIC: the method's own flags, the first recipe's values as their defaults
    parser.add_argument("--tau-base", type=Bounded(float, ge=0, le=1), default=0.99,
                        help="EMA rate of the target at step 0; it rises to 1 on a cosine (default: %(default)s)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=4096,
                        help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=256,
                        help="projector output width (default: %(default)s)")
    parser.add_argument("--pred-hidden-dim", type=positive_int, default=4096,
                        help="predictor hidden width (default: %(default)s)")
    # The offline check (--dataset synthetic): the 4-layer convnet, SGD for 80 epochs. With the LARS recipe
    # above BYOL learns there only after 1,500+ steps (README, BYOL deviation 5), more than a CPU check affords
    offline_check = dict(arch="convnet", epochs=80, optimizer="sgd", base_lr=0.05, weight_decay=5e-4)
    # TRY NOT TO MODIFY: the infrastructure flags every method shares, then parsing and checks
    add_common_args(parser)
    return parse_run_args(parser, argv, METHOD, RECIPES, offline_check)


# ALGO LOGIC: loss
def byol_loss(p, z):
    """Eq. (2) of the paper, one direction: the squared distance of the L2-normalised prediction
    and target projection, ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), averaged over the batch.
    The target z is a constant (stop-gradient). p, z: (N, D); returns a scalar in [0, 4]. Under
    torchrun, N is this process's share: averaged over the processes, the loss of the global batch."""
    cosine = (nn.functional.normalize(p, dim=1) * nn.functional.normalize(z.detach(), dim=1)).sum(dim=1)  # (N,)
    return (2 - 2 * cosine).mean()


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
    projector = projection_mlp([feature_dim, args.proj_hidden_dim, args.proj_dim])   # Linear-BN-ReLU-Linear
    predictor = projection_mlp([args.proj_dim, args.pred_hidden_dim, args.proj_dim])  # same shape
    online = nn.ModuleDict({"backbone": backbone, "projector": projector})
    target = copy.deepcopy(online).requires_grad_(False)  # starts equal to online; moved by ema_update only
    model = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor,
                           "target": target}).to(device)  # one state dict for checkpoints; moves online in place

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
                    p1, p2 = model["predictor"](z1), model["predictor"](z2)      # (B, proj_dim) predictions
                    with torch.no_grad():                                         # the target gets no gradient
                        target_z1 = target["projector"](target["backbone"](x1))   # (B, proj_dim)
                        target_z2 = target["projector"](target["backbone"](x2))
                # symmetrised: each view's prediction regresses the other view's target, the two averaged,
                # range [0, 4], as in the run behind 92.58% (solo-learn fca55e3 solo/methods/byol.py;
                # it sums since 365f2aa)
                ssl_loss = (byol_loss(p1.float(), target_z2.float()) + byol_loss(p2.float(), target_z1.float())) / 2
                tau = ema_momentum(global_step, total_steps, args.tau_base)     # the target's EMA rate: --tau-base -> 1
                terms = {"loss": ssl_loss, "tau": tau}                           # logged every --log-every steps

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
                # ALGO LOGIC: after each optimiser step the target moves towards the online network
                ema_update(target, online, tau)
                # TRY NOT TO MODIFY: SIGINT/SIGTERM stop after a whole step; checkpoint.pt every epoch, backbone.pt last
                run.stop_if_signalled(epoch, global_step)                    # a checkpoint at this step, exit 130/143
            run.end_of_epoch(epoch, global_step)                             # kNN every --eval-every, linear probe last


if __name__ == "__main__":
    main(parse_args())
