# SimCLR (Chen et al., ICML 2020) https://arxiv.org/abs/2002.05709 — needs common.py beside it
"""Contrast two augmented views of each image against every other image in the batch (NT-Xent).

Usage:
    python simclr.py --dataset synthetic                 # offline check: convnet, 40 epochs, 2 CPU cores, 12-16 min
    python simclr.py --dataset cifar10                   # reference recipe: 1000 epochs, one GPU
    python simclr.py --dataset folder --data-dir DIR     # DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg
    python simclr.py --recipe imagenet100 --data-dir IN100  # ResNet-18, 400 epochs: 77.04% online (solo-learn)
    python simclr.py --resume runs/NAME/checkpoint.pt    # continue a run where it stopped
    torchrun --standalone --nproc_per_node 8 simclr.py --dataset cifar10   # 8 GPUs: one GPU's steps (README)
Defaults are solo-learn's CIFAR configuration behind 90.74% linear top-1 (ResNet-18, 1000 epochs).
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

METHOD = "simclr"
# ALGO-SPECIFIC: the recipes, one per published setting (--recipe NAME; each lists what differs from the first, the
# default), from solo-learn fca55e3, the commit that posted its tables (bash_files/pretrain/*/simclr.sh, solo/args)
RECIPES = {
    # cifar/simclr.sh: behind 90.74% (online probe), ResNet-18; blur 0.5 was solo-learn's default then
    "cifar": dict(epochs=1000, batch_size=256, optimizer="lars", base_lr=0.4, weight_decay=1e-5, warmup_epochs=10,
                  final_lr_ratio=0.0, augmentations="symmetric", probe_lr=0.1),
    # imagenet-100/simclr.sh (its first run): behind 77.04% online / 77.48% offline; batch 128 x 2 GPUs
    "imagenet100": dict(dataset="folder", arch="resnet18", epochs=400, base_lr=0.3, weight_decay=1e-4, probe_lr=0.3,
                        proj_dim=128),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(parser, RECIPES)  # --recipe, then --epochs ... --probe-lr: the recipe's values
    # ALGO-SPECIFIC: the method's own flags, the first recipe's values as their defaults
    parser.add_argument("--temperature", type=Bounded(float, gt=0), default=0.2,
                        help="NT-Xent temperature tau (default: %(default)s)")
    parser.add_argument("--proj-hidden-dim", type=positive_int, default=2048,
                        help="projector hidden width (default: %(default)s)")
    parser.add_argument("--proj-dim", type=positive_int, default=256,
                        help="projector output width (default: %(default)s)")
    # The offline check (--dataset synthetic): the 4-layer convnet for 40 epochs (at 20, learning had often
    # not started before the learning rate decayed), without the recipe's blur, which at 32 px erases the
    # synthetic textures (RESULTS.md §12); flags given on the command line still win
    offline_check = dict(arch="convnet", epochs=40, blur_p=0.0)
    # TRY NOT TO MODIFY: the infrastructure flags every method shares, then parsing and checks
    add_common_args(parser)
    return parse_run_args(parser, argv, METHOD, RECIPES, offline_check)


# ALGO LOGIC: loss
def nt_xent_loss(z1, z2, temperature=0.2):
    """NT-Xent, eq. (1) of the paper, averaged over all 2N anchors:
        l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),  s = cosine similarity,
    where j is the other view of anchor i's image and the other 2N - 2 views are negatives.
    z1, z2: (N, D) projections of the two views; returns a scalar. Under torchrun, N is the global
    batch: every process gathers all processes' projections (gradients flow back, see common.gather)."""
    z1, z2 = gather(z1), gather(z2)                                           # (N, D) each, all processes
    n = z1.shape[0]
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)                  # (2N, D), unit rows
    logits = z @ z.T / temperature                                            # (2N, 2N), s_ik / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))                     # drop k = i from the sum
    positive = torch.arange(2 * n, device=z.device).roll(n)                   # (2N,) j = i + N mod 2N
    positive_logits = logits.gather(1, positive[:, None]).squeeze(1)          # (2N,) s_ij / tau
    return (torch.logsumexp(logits, dim=1) - positive_logits).mean()         # log-sum-exp: stable


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
        [feature_dim, args.proj_hidden_dim, args.proj_dim], batch_norm=False
    )  # Linear-ReLU-Linear
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
                ssl_loss = nt_xent_loss(z1.float(), z2.float(), args.temperature)
                terms = {"loss": ssl_loss}                                       # logged every --log-every steps

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
