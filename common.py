# What every method file shares, in the order a reader of a method file needs it: the backbone and
# heads, EMA target networks, the augmentation recipes, the orthogonality penalties, optimisation and
# evaluation; then, below the PLUMBING banner, flags, data loading, checkpoints and logging. It needs no other file
# from the project: a method file plus this one, copied into another project, train on an
# ImageFolder tree or torchvision's datasets. Optional modules beside it add speed, an offline data
# set and torchrun: tensor_pipeline.py (batched augmentation on the GPU), synthetic.py, distributed.py.
import argparse
import atexit
import collections
import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image


# ---- Backbone and projection heads ---------------------------------------------------------------
ARCHS = ("resnet18", "resnet34", "resnet50", "convnet")


def small_convnet():
    """Four conv layers, 256 features. For quick CPU checks only: its accuracies say nothing
    about ResNet results."""
    def block(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 256, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_backbone(arch, image_size, zero_init_residual=False):
    """Returns (backbone, feature_dim). Backbone maps (B, 3, H, W) images to (B, feature_dim). zero_init_residual:
    the last BatchNorm of every residual block starts at 0 (Goyal et al., 2017), as INTL's ResNet-50.
    At 64 px or less the CIFAR stem replaces the 7x7/2 conv and max-pool, which lose most of 32 px:
    a 3x3/1 conv with padding 2, so 32 px inputs give 34x34 maps (solo-learn fca55e3
    solo/methods/base.py; INTL 0aa69af src/resnet.py pads 1 before a padding-1 conv, the same)."""
    if arch == "convnet":
        return small_convnet(), 256
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features  # 512 for resnet18/34, 2048 for resnet50
    net.fc = nn.Identity()
    return net, feature_dim


def projection_mlp(dims, batch_norm=True, hidden_bias=True):
    """[Linear (-BN) -ReLU] for each hidden width, then a plain Linear: dims = [in, hidden..., out]."""
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=hidden_bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


# ---- Target networks: a moving average of the online network (BYOL; INTL's --ema, the authors' intl_m) ---------
def ema_momentum(step, total_steps, base):
    """The target's momentum after optimiser step k (from 0): m = 1 - (1 - base) (1 + cos(pi k / K)) / 2, from base
    at k = 0 to 1 at k = K (BYOL, section 3.3 of the paper; INTL 0aa69af main.py)."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * step / total_steps)) / 2


@torch.no_grad()
def ema_update(target, online, m):
    """target <- m target + (1 - m) online, parameter by parameter (BYOL eq. 1; INTL methods/intl_m.py). Only
    parameters are averaged: BatchNorm running statistics are buffers, and the target keeps its own, updated from
    the batches it sees in train mode (it normalises with batch statistics during training, as the reference codes)."""
    for target_param, online_param in zip(target.parameters(), online.parameters()):
        target_param.lerp_(online_param, 1 - m)


# ---- Augmentation recipes: two views of every image (or more), each with its own random draws ---------
def view_transform(crop_size, mean, std, crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4,
                   saturation=0.2, hue=0.1, jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0,
                   flip_p=0.5):
    """One augmented view of a PIL image. Each call draws its own random parameters, so every
    image in a batch gets its own crop, jitter and flip."""
    steps = [T.RandomResizedCrop(crop_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
             T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p),
             T.RandomGrayscale(p=gray_p)]
    if blur_p > 0:
        kernel_size = blur_kernel_size(crop_size)
        steps.append(T.RandomApply([T.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
    steps += [T.RandomHorizontalFlip(p=flip_p), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def blur_kernel_size(crop_size):
    """Taps of the Gaussian blur (sigma in [0.1, 2], SimCLR's): about 10% of the image side, odd, and
    at least 13 = 2 ceil(3 x 2) + 1, so that small images are blurred by the full Gaussian like
    solo-learn's PIL GaussianBlur(radius=sigma) (fca55e3 solo/utils/contrastive_dataloader.py)."""
    return max(2 * int(0.05 * crop_size) + 1, 13)


class Views:
    """Turns one image into its views [view(image) for each view transform], each with its own randomness."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, image):
        return [view(image) for view in self.transforms]


# Per-view settings of the configs behind the published numbers (solo-learn fca55e3: bash_files/pretrain/
# {cifar,imagenet-100}/*.sh, solo/args/{dataset,utils}.py; INTL 0aa69af cifar/transform.py, src/transform.py).
AUGMENTATION_RECIPES = {
    # SimCLR: strong jitter; blur 0.5 (solo-learn's default, not switched off by its CIFAR script until e90d420)
    "symmetric": [dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5)] * 2,
    # BYOL, INTL: solarisation on the second view only; blur 1.0 / 0.1 above 64 px only (recipe_settings)
    "asymmetric": [dict(solarize_p=0.0), dict(solarize_p=0.2)],
    # VICReg: milder crops, solarisation 0.1 and blur 0.5 on both views
    "vicreg": [dict(crop_scale=(0.2, 1.0), solarize_p=0.1, blur_p=0.5)] * 2,
    # INTL's ImageNet multi-crop (Multi_Crop): 2 x 224, 192, 160, 128, 96 px, each crop at 224-px images (scaled
    # with the image size here), the scale range shrinking with it; blur 0.5 and solarisation 0.1 on every crop
    "multicrop": [dict(crop_size=size, crop_scale=scale, blur_p=0.5, solarize_p=0.1) for size, scale in (
        (224, (0.2, 1.0)), (224, (0.2, 1.0)), (192, (0.171, 0.857)), (160, (0.143, 0.714)), (128, (0.114, 0.571)),
        (96, (0.086, 0.429)))],
}
AUGMENTATIONS = tuple(AUGMENTATION_RECIPES)


def recipe_settings(name, crop_size, blur_p=None):
    """The keyword settings of every view of a named recipe (a list), for images of crop_size pixels: a view's
    own crop_size, given at 224 px, scaled to them; blur_p (--blur-p), when given, replaces every view's blur."""
    views = [dict(settings) for settings in AUGMENTATION_RECIPES[name]]
    if name == "asymmetric" and crop_size > 64:  # the asymmetric pair blurs only above 64 px (solo-learn)
        views[0]["blur_p"], views[1]["blur_p"] = 1.0, 0.1
    for view in views:
        view["crop_size"] = round(view["crop_size"] * crop_size / 224) if "crop_size" in view else crop_size
        view["blur_p"] = view.get("blur_p", 0.0) if blur_p is None else blur_p
    return views


def augmentation_recipe(name, crop_size, mean, std, blur_p=None):
    """The PIL view transforms of a named recipe, for images of crop_size pixels."""
    return [view_transform(mean=mean, std=std, **view) for view in recipe_settings(name, crop_size, blur_p)]


def eval_size(image_size):
    """The shorter side clean images are resized to before their centre crop: 256 for 224 px crops (ImageNet's
    protocol, INTL 0aa69af evaluate.py, solo-learn), the crop size itself at 96 px and below."""
    return round(image_size * 256 / 224) if image_size > 96 else image_size


def eval_transform(image_size, mean, std):
    """Clean images for evaluation: resize the shorter side (eval_size), centre crop, normalise."""
    return T.Compose([T.Resize(eval_size(image_size), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


# ---- Orthogonality regularization (He, Du, Ma, NeurIPS 2024): SO and SRIP penalties on the weights ----
ORTHO_KINDS = ("none", "so", "srip")
ORTHO_WEIGHTS = {"none": 0.0, "so": 1e-6, "srip": 1e-3}  # the paper's values for ResNet-18/50
SRIP_WARMUP_ITERS, SRIP_STEP_ITERS = 100, 2  # power iterations at the start, then per training step


def regularised_layers(module):
    """(name, layer) of every Conv2d and Linear in module, in definition order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weight_matrix(layer):
    """A Conv2d weight (out, in, kh, kw) as out x (in kh kw); a Linear weight (out, in) as it is."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def _layers_of(module_or_layers):
    if isinstance(module_or_layers, nn.Module):
        return [layer for _, layer in regularised_layers(module_or_layers)]
    return list(module_or_layers)


def gram_residuals(module_or_layers):
    """G - I of every regularised layer, with G on the smaller side of W (out x fan_in):
    G = W W^T if out <= fan_in, else W^T W, so G = I exactly when W is (semi-)orthogonal.
    Layers of equal weight shape share one batched matmul. Returns [(L, k, k) tensor per shape],
    in order of each shape's first layer."""
    groups = {}
    for layer in _layers_of(module_or_layers):
        groups.setdefault(tuple(layer.weight.shape), []).append(layer)
    residuals = []
    for members in groups.values():
        w = torch.stack([weight_matrix(layer) for layer in members]).float()  # (L, out, fan_in)
        if w.shape[1] > w.shape[2]:
            w = w.transpose(1, 2)                                              # (L, k, n), k = the smaller side
        gram = w @ w.transpose(1, 2)                                           # (L, k, k)
        residuals.append(gram - torch.eye(gram.shape[-1], device=gram.device))
    return residuals


def so_penalty(module_or_layers):
    """Soft Orthogonality: sum over layers of ||G - I||_F^2 (a scalar tensor with gradients)."""
    return sum((r.pow(2).sum() for r in gram_residuals(module_or_layers)), torch.zeros(()))


def srip_penalty(module_or_layers, iters=SRIP_WARMUP_ITERS, vectors=None):
    """SRIP (Bansal et al., 2018): sum over layers of sigma_max(G - I), the spectral norm of the
    symmetric residual estimated by power iteration. Each layer's unit vector v takes `iters`
    steps v <- R v / |R v| without gradient, then sigma = |R v| carries the gradient (as torch's
    spectral_norm does). vectors: None starts from random vectors; a list of (L, k, 1) tensors,
    one per weight shape (see gram_residuals), starts from them and is updated in place, so that
    a few iterations per training step track the top singular vector as the weights move."""
    residuals = gram_residuals(module_or_layers)
    if vectors is None:
        vectors = [F.normalize(torch.randn(r.shape[0], r.shape[1], 1, device=r.device), dim=1) for r in residuals]
    total = torch.zeros(())
    for r, v in zip(residuals, vectors):
        with torch.no_grad():
            for _ in range(iters):
                v.copy_(F.normalize(r @ v, dim=1))                             # (L, k, 1)
        total = total + (r @ v.clone()).norm(dim=1).sum()  # a copy: the next call updates v in place
    return total


def orthogonality_error(module_or_layers):
    """Mean over layers of ||G - I||_F: 0 for (semi-)orthogonal weights."""
    with torch.no_grad():
        norms = torch.cat([torch.linalg.matrix_norm(r) for r in gram_residuals(module_or_layers)])
    return norms.mean().item()


class OrthogonalityRegularizer(nn.Module):
    """The penalty of --ortho on the backbone's Conv2d and Linear layers (with heads=True also
    the projector's and predictor's; a BYOL target is never regularised). Calling it returns the
    penalty: SO, SRIP, or 0 for 'none'. It has no parameters; for SRIP its buffers are the
    persistent power-iteration vectors, so checkpoints carry them and a resumed run continues
    exactly. The layers are referenced, not registered: the model's state dict holds them once."""

    def __init__(self, model, kind="none", heads=False):
        super().__init__()
        parts = ["backbone"] + (["projector", "predictor"] if heads else [])
        named = [(f"{part}.{name}", layer) for part in parts if part in model
                 for name, layer in regularised_layers(model[part])]
        self.kind, self.layer_names, self.layers = kind, [name for name, _ in named], [layer for _, layer in named]
        if kind == "srip":  # own generator: the run's random stream stays that of --ortho none
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for i, r in enumerate(gram_residuals(self.layers)):
                    start = torch.randn(r.shape[0], r.shape[1], 1, generator=generator).to(r.device)
                    self.register_buffer(f"srip_vectors_{i}", F.normalize(start, dim=1))
                srip_penalty(self.layers, SRIP_WARMUP_ITERS, self.srip_vectors())  # converge on the initial weights

    def srip_vectors(self):
        return [buffer for name, buffer in self.named_buffers() if name.startswith("srip_vectors_")]

    def forward(self):
        if self.kind == "so":
            return so_penalty(self.layers)
        if self.kind == "srip":
            return srip_penalty(self.layers, SRIP_STEP_ITERS, self.srip_vectors())
        return self.layers[0].weight.new_zeros(())

    def describe(self):
        return f"{len(self.layers)} layers ({', '.join(self.layer_names)})"


# ---- Optimisation --------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al., 2017), clipped as in NVIDIA's
    LARC. For each parameter of a group with lars=True:
        trust = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
        trust = min(trust / lr, 1)                      if clip (the step never exceeds plain SGD's)
        update = trust * (g + weight_decay * w)         (trust = 1 where ||w|| or ||g|| is 0)
        buf = momentum * buf + update;   w -= lr * buf
    Groups with lars=False (biases, norm layers) take plain SGD steps with their own weight decay.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.02,
                 clip=True, eps=1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lars=True,
                        trust_coefficient=trust_coefficient, clip=clip, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad.clone()
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    trust = group["trust_coefficient"] * w_norm / (g_norm + weight_decay * w_norm + group["eps"])
                    if group["clip"]:
                        trust = torch.clamp(trust / lr, max=1.0)
                    update.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0))  # no host sync
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-lr)


def build_optimizer(name, model, lr, weight_decay, probe_lr=None):
    """lars: biases and norm parameters (ndim <= 1) get neither weight decay nor trust scaling, as in solo-learn's
    configs. sgd: momentum 0.9, weight decay on every parameter (INTL's CIFAR code); sgd-norms-excluded: biases
    and norms without weight decay (INTL's ImageNet main.py: param.ndim == 1). The online
    probe (model["online_probe"], if any) trains in the same optimiser and schedule, at probe_lr at
    the schedule's peak and without weight decay (solo-learn fca55e3 solo/methods/base.py)."""
    probe = set(model["online_probe"].parameters()) if "online_probe" in model else set()
    params = [p for p in model.parameters() if p.requires_grad and p not in probe]
    ratio = (probe_lr or lr) / lr
    probe_groups = [{"params": [p for p in probe if p.ndim > 1], "weight_decay": 0.0, "lr_ratio": ratio},
                    {"params": [p for p in probe if p.ndim <= 1], "weight_decay": 0.0, "lr_ratio": ratio,
                     "lars": False}]
    if name.startswith("sgd"):
        excluded = {p for p in params if p.ndim <= 1 and name == "sgd-norms-excluded"}
        groups = [{"params": [p for p in params if p not in excluded]},
                  {"params": [p for p in params if p in excluded], "weight_decay": 0.0}]
        groups += [{k: v for k, v in g.items() if k != "lars"} for g in probe_groups]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=0.9, weight_decay=weight_decay)
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}] + probe_groups
    return LARS([g for g in groups if g["params"]], lr=lr, momentum=0.9, weight_decay=weight_decay,
                trust_coefficient=0.02)


def warmup_cosine(step, total_steps, warmup_steps, peak, final=0.0):
    """Linear warm-up to `peak` over warmup_steps (step 0 takes peak / warmup_steps), then a cosine
    from peak to `final` at total_steps. `step` counts optimiser steps from 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Set every group's lr to lr, times the group's lr_ratio where it has one (the online probe)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    return lr


def autocast(device, precision):
    """bf16/fp16 autocast for the forward pass; losses are computed in fp32 by the caller."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def optimizer_step(loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients(optimizer)  # torchrun: the mean over the processes, as DDP's; nothing in one process
    scaler.step(optimizer)
    scaler.update()


# ---- Evaluation: kNN and a linear probe on frozen clean features, and collapse diagnostics -------
# At ImageNet scale the features stay on the training device, and two subsets keep an evaluation in minutes: kNN
# and the probes take at most EVAL_TRAIN_IMAGES training images (evenly spaced, build_data), the collapse
# diagnostics at most RANKME_IMAGES of them (the sample size of RankMe, Garrido et al., 2023).
EVAL_TRAIN_IMAGES, RANKME_IMAGES = 100_000, 25_600


def evenly_spaced(count, limit):
    """Indices of at most `limit` of `count` items, evenly spaced from the first to the last (every index when count <=
    limit): an int64 array, in float64 arithmetic, so that both pipelines and evaluate pick the same images."""
    return np.linspace(0, count - 1, min(count, limit)).astype(np.int64)


@torch.no_grad()
def extract_features(backbone, loader, device):
    """Backbone features of every image in loader, in eval mode, on `device`: (N, F) float32 and (N,) labels."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(images.to(device, non_blocking=True)).float())
        labels.append(targets.to(device))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1,
                weighted=True, metric="cosine", chunk_size=1024):
    """kNN. metric cosine: neighbours by cosine similarity, and weighted, each of the k votes
    exp(sim / temperature) for its class (InstDisc; lightly's benchmark protocol: k=200, T=0.1).
    metric euclidean: neighbours by Euclidean distance of the raw features (INTL's 5-NN, 0aa69af
    cifar/eval/evaluate.py). Unweighted: a majority vote, ties to the lowest class (as INTL's)."""
    if metric == "cosine":
        train_features, test_features = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    k = min(k, len(train_features))
    predictions = []
    for chunk in test_features.split(chunk_size):
        similarity = chunk @ train_features.T if metric == "cosine" else -torch.cdist(chunk, train_features)  # (C, N)
        top_similarity, top_index = similarity.topk(k, dim=1)          # (C, k)
        votes = (top_similarity / temperature).exp() if weighted else torch.ones_like(top_similarity)  # (C, k)
        scores = torch.zeros(len(chunk), num_classes, dtype=votes.dtype, device=votes.device)
        scores.scatter_add_(1, train_labels[top_index], votes)                # (C, classes)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


def accuracy(predictions, labels):
    return (predictions == labels).float().mean().item() * 100


@torch.no_grad()
def top1_top5(classifier, features, labels):
    """Top-1 and top-5 accuracy in % of a classifier on features (N, F) for labels (N,); top-k of fewer classes."""
    logits = classifier(features)                                                # (N, classes)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices                   # (N, 5)
    return accuracy(top5[:, 0], labels), (top5 == labels[:, None]).any(dim=1).float().mean().item() * 100


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes, epochs=100,
                 batch_size=256, lr=1e-3, weight_decay=1e-6, seed=0):
    """A linear classifier trained on frozen, standardised features (Adam, cosine schedule).
    Returns (top1, top5) test accuracy in %."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    classifier = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    nn.init.zeros_(classifier.weight)  # a convex problem: zero init makes the probe deterministic
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    step = 0
    for _ in range(epochs):
        for index in torch.randperm(len(train_x), generator=generator).to(train_x.device).split(batch_size):
            set_lr(optimizer, warmup_cosine(step, epochs * steps_per_epoch, 0, lr))
            loss = F.cross_entropy(classifier(train_x[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return top1_top5(classifier, test_x, test_labels)


def online_probe_loss(probe, features, labels):
    """solo-learn's online linear classifier (fca55e3 solo/methods/base.py): cross-entropy of a
    Linear on the *detached* backbone features of each view, averaged over the views, so no gradient
    reaches the backbone. Images without a label (-1, STL-10's unlabeled split) are left out."""
    labels = gather(labels)  # torchrun: the global batch, so the loss is one process's (same unlabelled images)
    losses = [F.cross_entropy(probe(gather(h.detach()).float()), labels, ignore_index=-1) for h in features]
    return torch.stack(losses).nan_to_num().mean()  # a batch without any label gives 0


def effective_rank(spectrum):
    """exp of the entropy of a spectrum normalised to sum 1 (Roy & Vetterli 2007; RankMe):
    k equal values give k, one non-zero value gives 1."""
    p = spectrum.double().clamp(min=0)
    p = p / p.sum()
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return entropy.exp().item()


def embedding_stats(z):
    """Collapse diagnostics of embeddings z (N, D). erank: RankMe (Garrido et al., 2023), the
    effective rank of z's singular values. std: the mean per-dimension std of the L2-normalised
    rows times sqrt(D), about 1 when spread over the sphere and 0 when collapsed to a point
    (SimSiam's diagnostic)."""
    z = z.double()
    std = F.normalize(z, dim=1).std(dim=0).mean().item() * math.sqrt(z.shape[1])
    return {"erank": effective_rank(torch.linalg.svdvals(z)), "std": std}


def evaluate(model, data, device, linear=False):
    """On clean features: weighted kNN (k=200), 5-NN (cosine, and INTL's Euclidean), the online probe's accuracy
    (when the model has one, trained on labels), collapse diagnostics of the representation and the projector output,
    the mean orthogonality error of the regularised layers (the backbone's when the model has no regularizer), and
    optionally the fast linear probe. Without labelled images (eval_test_loader None) the diagnostics alone."""
    train_features, train_labels = extract_features(model["backbone"], data.eval_train_loader, device)
    results, labelled = {}, data.eval_test_loader is not None
    if labelled:
        test_features, test_labels = extract_features(model["backbone"], data.eval_test_loader, device)
        knn = lambda **kw: accuracy(knn_predict(  # noqa: E731
            train_features, train_labels, test_features, data.num_classes, **kw), test_labels)
        results = {"knn_top1": knn(k=200, temperature=0.1), "knn5_top1": knn(k=5, weighted=False),
                   "knn5_euclidean_top1": knn(k=5, weighted=False, metric="euclidean"),
                   "eval_train_images": len(train_features)}  # what kNN and the probes learn from
    if labelled and "online_probe" in model and data.pretrain_labels:  # it trains on the pretraining images' labels
        results["online_top1"], results["online_top5"] = top1_top5(model["online_probe"], test_features, test_labels)
    projector, was_training = model["projector"], model["projector"].training
    features = train_features[torch.from_numpy(evenly_spaced(len(train_features), RANKME_IMAGES)).to(device)]  # (n, F)
    with torch.no_grad():  # projector output of the cached clean features, (n, D)
        z = torch.cat([projector.eval()(h).float() for h in features.split(4096)])
    projector.train(was_training)
    for name, values in (("rep", features), ("proj", z)):
        stats = embedding_stats(values)
        results[f"{name}_erank"], results[f"{name}_std"] = stats["erank"], stats["std"]
    layers = model["ortho"].layers if "ortho" in model else model["backbone"]
    results["ortho_error"] = orthogonality_error(layers)
    if linear and labelled:
        results["linear_top1"], results["linear_top5"] = linear_probe(
            train_features, train_labels, test_features, test_labels, data.num_classes)
    return results


# ##############################################################################################
# PLUMBING: flags, processes, data, the run folder, checkpoints, logging and stopping. No method's maths
# here; read it when something about a run (not a result) surprises you. A method's main() calls, in order:
# start_processes, claim_run_folder, seed_everything, build_data, resume, Run, stop_safely, epoch_batches,
# optimizer_step (above), then Run.train_step, Run.stop_if_signalled and Run.end_of_epoch.
# ##############################################################################################

# ---- Flags ---------------------------------------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
RESUME_OVERRIDABLE = ("device", "num_workers", "data_dir", "eval_data_dir", "log_every", "skip_bad_images")
OVERRIDABLE_FLAGS = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_OVERRIDABLE)


def die(message, code=2):
    """End the run with one line: exit code 2 for bad input (flags, data, run folder), 1 for what goes wrong
    while running that no change to the code fixes (out of memory, a failed write, data gone, a NaN loss)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # torchrun: one line per machine, not one per process
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class Bounded:
    """argparse type: a number of `kind` within bounds, e.g. Bounded(float, gt=0). Every numeric flag has one (a
    test checks), so a value out of range ends the parse in one line naming the valid range, exit code 2."""

    def __init__(self, kind, gt=None, ge=None, le=None):
        self.kind, self.gt, self.ge, self.le = kind, gt, ge, le
        bounds = [f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<=", le)) if v is not None]
        self.valid = ("an integer " if kind is int else "a number ") + " and ".join(bounds)

    def __call__(self, text):
        with contextlib.suppress(ValueError):
            value = self.kind(text)
            if math.isfinite(value) and (self.gt is None or value > self.gt) and \
                    (self.ge is None or value >= self.ge) and (self.le is None or value <= self.le):
                return value
        raise argparse.ArgumentTypeError(f"expected {self.valid}, got {text}")

    def __repr__(self):
        return self.valid


positive_int = Bounded(int, ge=1)


def parse_or_die(parser, argv):
    """parser.parse_args(argv), any error (unknown flag, bad choice, value out of range) one line, exit 2."""
    parser.error = lambda message: die(f"{message} (see --help)")
    return parser.parse_args(argv)


def add_recipe_args(parser, recipes):
    """--recipe, and the optimisation and augmentation flags with the first recipe's values as their defaults. A
    method file declares its recipes (one per published setting, each value beside its source): parse_run_args
    gives the chosen one's values to the flags not given."""
    names, first = list(recipes), next(iter(recipes.values()))
    add = parser.add_argument_group("recipe (defaults: this method's reference configuration)").add_argument
    add("--recipe", choices=names, default=names[0], help="the published setting whose values the flags below take "
        "unless given: " + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in recipe.items())}" for name, recipe in
                                     list(recipes.items())[1:]) + " (default: %(default)s, the values shown)")
    add("--epochs", type=positive_int, default=first["epochs"], help="pretraining epochs (default: %(default)s)")
    add("--batch-size", type=Bounded(int, ge=2), default=first["batch_size"], help="images per step (default: "
        "%(default)s)")
    add("--optimizer", choices=("lars", "sgd", "sgd-norms-excluded"), default=first["optimizer"], help="lars: biases "
        "and norms without weight decay or trust scaling; sgd: momentum 0.9, decay on every parameter (or not on "
        "biases and norms) (default: %(default)s)")
    add("--base-lr", type=Bounded(float, gt=0), default=first["base_lr"],
        help="lr at batch 256: peak lr = base-lr x batch / 256 (default: %(default)s)")
    add("--weight-decay", type=Bounded(float, ge=0), default=first["weight_decay"], help="weight decay (default: "
        "%(default)s)")
    add("--warmup-epochs", type=Bounded(int, ge=0), default=first["warmup_epochs"],
        help="linear warm-up, then a cosine, per step (default: %(default)s, at most a tenth of --epochs)")
    add("--final-lr-ratio", type=Bounded(float, ge=0, le=1), default=first["final_lr_ratio"],
        help="the cosine ends at this fraction of the peak lr (default: %(default)s)")
    add("--augmentations", choices=AUGMENTATIONS, default=first["augmentations"],
        help="the views of a published config, see README (default: %(default)s)")
    add("--blur-p", type=Bounded(float, ge=0, le=1), help="blur probability of every view (default: the recipe's)")
    add("--probe-lr", type=Bounded(float, gt=0), default=first["probe_lr"],
        help="peak lr of the online linear probe, not scaled by the batch, no weight decay (default: %(default)s)")


def add_common_args(parser):
    """The infrastructure flags every method shares: data, device, precision, logging, run folder, resume, --ortho."""
    add = parser.add_argument_group("data").add_argument
    add("--dataset", choices=DATASETS, default="cifar10", help="cifar10/cifar100/stl10 download into --data-dir; "
        "folder: DATA_DIR/{train,test or val}/<class>/* or any images; synthetic: offline (default: %(default)s)")
    add("--data-dir", default="./data", help="where datasets are read or downloaded (default: %(default)s)")
    add("--eval-data-dir", help="folder: DIR/{train,test}/<class>/* to evaluate a --data-dir of unlabelled images on")
    add("--synthetic-size", type=Bounded(int, ge=10), default=5000,
        help="training images of --dataset synthetic; the test set is a fifth (default: %(default)s)")
    add("--image-size", type=Bounded(int, ge=8),
        help="crop size (default: the dataset's: 32 CIFAR, 96 STL-10, a folder's first image, 224 above 96 px)")
    add("--pipeline", choices=("auto", "tensor", "pil"), default="auto", help="tensor: uint8 images on the device, "
        "augmented in batches (tensor_pipeline.py); pil: DataLoader workers; auto: tensor if it fits")
    add("--num-workers", type=Bounded(int, ge=0), default=min(8, torch.get_num_threads()),
        help="data loading processes of the pil pipeline (default: %(default)s, the CPU threads up to 8)")
    add("--overlap", action="store_true", help="tensor pipeline: augment the next batch during this step")
    add("--skip-bad-images", action="store_true", help="leave out the unreadable images of a folder (default: stop)")
    add = parser.add_argument_group("run").add_argument
    add("--arch", choices=ARCHS, default="resnet18", help="backbone; convnet: 4 layers, for CPU checks (default: "
        "%(default)s)")
    add("--zero-init-residual", action=argparse.BooleanOptionalAction, default=False,
        help="the last BatchNorm of every residual block starts at 0 (default: off)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    add("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
        help="autocast dtype of the forward pass; losses stay fp32 (default: auto: bf16 on a GPU, else fp32)")
    add("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
        metavar="MODE", help="torch.compile the backbone in MODE (default: default; reduce-overhead: CUDA graphs)")
    add("--seed", type=Bounded(int, ge=0, le=2**32 - 1), default=0, help="seeds everything (default: %(default)s)")
    add("--deterministic", action="store_true", help="deterministic GPU kernels only: bit-exact resumes, slower steps")
    add("--eval-every", type=positive_int, help="evaluate every N epochs and at the end (default: a tenth of --epochs)")
    add("--log-every", type=positive_int, default=50, help="progress line every N steps (default: %(default)s)")
    add("--out-dir", default="runs", help="parent folder of run folders (default: %(default)s)")
    add("--run-name", help="run folder name, a new one (default: method-dataset-arch-seed-time)")
    add("--resume", metavar="PATH", help="continue from a checkpoint.pt with its arguments (only "
        f"{OVERRIDABLE_FLAGS} may change)")
    add = parser.add_argument_group("orthogonality regularization (He, Du, Ma, NeurIPS 2024)").add_argument
    add("--ortho", choices=ORTHO_KINDS, default="none", help="penalty on the backbone's conv and linear weights: "
        "so = soft orthogonality, srip = spectral norm of W^T W - I (default: %(default)s)")
    add("--ortho-weight", type=Bounded(float, ge=0), help="weight of the penalty (default: 1e-6 so, 1e-3 srip, the "
        "paper's)")
    add("--ortho-heads", action="store_true", help="regularise the projector and predictor too, not only the backbone")


def parse_run_args(parser, argv, method, recipes, offline_check):
    """Parse argv (None: the command line) once. A flag given on the command line always wins; the defaults
    that depend on other flags fill in the rest: --recipe's values, then on --dataset synthetic (the offline
    check) the method's offline_check settings, --warmup-epochs is capped at a tenth of --epochs, --eval-every is
    a tenth of --epochs, --ortho-weight the paper's value for --ortho. --resume takes the checkpoint's arguments; only
    RESUME_OVERRIDABLE may be given again."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.allow_abbrev = False  # every flag spelled out in full, as `given` reads them
    parser.epilog = ("--dataset synthetic (the offline check) changes these defaults: "
                     + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in offline_check.items()))
    args = parse_or_die(parser, argv)
    options = {option: action.dest for action in parser._actions for option in action.option_strings}
    given = {options[word.split("=")[0]] for word in argv if word.split("=")[0] in options}
    if args.resume:
        refused = sorted("--" + k.replace("_", "-") for k in given - {"resume", *RESUME_OVERRIDABLE})
        if refused:
            die(f"--resume continues a run with its stored arguments; only {OVERRIDABLE_FLAGS} may change, not "
                f"{', '.join(refused)}")
        stored = load_checkpoint(args.resume)
        if stored.get("method") != method:
            die(f"{args.resume} is " + (f"a {stored['method']}.py checkpoint; resume it with that script" if "method"
                in stored else "not a training checkpoint (a backbone.pt holds weights only)"))
        args = argparse.Namespace(**{**stored["args"], **{name: getattr(args, name) for name in given}})
    else:
        recipe = recipes[args.recipe]
        dataset = args.dataset if "dataset" in given else recipe.get("dataset", args.dataset)
        for name, value in {**recipe, **(offline_check if dataset == "synthetic" else {})}.items():
            setattr(args, name, getattr(args, name) if name in given else value)
        if "warmup_epochs" not in given:
            args.warmup_epochs = min(args.warmup_epochs, args.epochs // 10)
        if "eval_every" not in given:
            args.eval_every = max(1, args.epochs // 10)
        views = len(AUGMENTATION_RECIPES[args.augmentations])
        if views > 2 and all(recipe.get("augmentations") != args.augmentations for recipe in recipes.values()):
            die(f"--augmentations {args.augmentations} makes {views} views; {method}.py trains on two")
        if args.ortho == "none" and args.ortho_weight:
            die(f"--ortho-weight {args.ortho_weight:g} has no effect without --ortho so or --ortho srip")
        args.ortho_weight = ORTHO_WEIGHTS[args.ortho] if args.ortho_weight is None else args.ortho_weight
        args.method, stamp = method, time.strftime("%Y%m%d-%H%M%S")
        args.run_name = args.run_name or f"{method}-{args.dataset}-{args.arch}-s{args.seed}-{stamp}"
        if os.path.basename(args.run_name) != args.run_name or args.run_name in (".", ".."):
            die(f"--run-name {args.run_name} must be a plain folder name; put the parent folder in --out-dir")
    args.device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, args.device)
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        die("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if args.warmup_epochs > args.epochs:
        die(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}; pass {args.epochs} or fewer")
    return args


def resolve_device(name):
    """'auto': cuda when torch sees a GPU, else cpu. cpu, cuda, cuda:N and mps when torch sees them."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    cuda = name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())
    if name == "cpu" or (name == "mps" and torch.backends.mps.is_available()) or \
            (cuda and int(name[5:] or 0) < torch.cuda.device_count()):
        return name
    die(f"--device {name} is not a device this code runs on here (torch sees {torch.cuda.device_count()} GPUs); use "
        f"auto, cpu, cuda, cuda:N or mps")


def resolve_precision(precision, device):
    """'auto': bf16 autocast on a GPU, fp32 on the CPU (where bf16 convolutions are slow)."""
    return ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision


# ---- Processes and seeding -----------------------------------------------------------------------
# distributed.py (optional, beside this file) holds the torchrun plumbing; without it, or in one process,
# gather, average_gradients, sync_batch_norm, mean_over_processes and signalled_anywhere change nothing.
try:
    from distributed import (average_gradients, gather, join_processes, mean_over_processes, peer_lost,
                             signalled_anywhere, sync_batch_norm)
except ImportError:
    join_processes, peer_lost = None, lambda error: False
    gather = sync_batch_norm = mean_over_processes = signalled_anywhere = lambda x: x  # noqa: E731
    average_gradients = lambda optimizer: None  # noqa: E731


def start_processes(device, batch_size):
    """(rank, number of processes): (0, 1) without torchrun; under torchrun, distributed.join_processes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        print("1 process trains (torchrun --nproc_per_node N runs N, README: Many GPUs)")
        return 0, 1
    if join_processes is None:
        die("torchrun needs distributed.py beside common.py; copy it there, or run python METHOD.py (one process)")
    if batch_size % world_size:
        die(f"--batch-size {batch_size} is the global batch and must divide among the {world_size} processes")
    return join_processes(device, batch_size, world_size), world_size


def seed_everything(seed, deterministic=False):
    """Seeds python, numpy and torch (every CUDA device too). cuDNN then picks its fastest kernels for the fixed
    input shapes; deterministic (--deterministic) takes deterministic ones only, for bit-exact GPU resumes."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # an op without such a kernel warns
    torch.backends.cudnn.benchmark = not deterministic


def seed_worker(worker_id):
    """DataLoader seeds each worker's torch from the loader's generator; python and numpy follow it (forked
    workers would share the parent's). Signals are the main process's: it finishes its step, then stops them."""
    random.seed(torch.initial_seed() % 2**32)
    np.random.seed(torch.initial_seed() % 2**32)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def prepare_model(model, device, compile=None):
    """The GPU fast path: channels_last weights (cuDNN's tensor-core kernels then need no layout change) and,
    with --compile MODE, every backbone compiled in place (the state dict's names unchanged)."""
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if compile:
        for name, module in model.named_modules():
            if name.endswith("backbone"):
                module.compile(mode=compile)
    return model


# ---- Data ----------------------------------------------------------------------------------------
# Per-channel mean and std of each training set; `folder` takes ImageNet's, `synthetic` its own images'.
NORMALIZATION = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                 "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                 "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
                 "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": 32}
UNREADABLE = {}  # (folder, number of images) -> its unreadable images: each folder is decoded once per process


def torchvision_split(name, data_dir, split, transform):
    """One split of a torchvision dataset, downloaded into data_dir if missing."""
    try:
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
            return torchvision.datasets.STL10(data_dir, split=stl_split, transform=transform, download=True)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(data_dir, train=split != "test", transform=transform, download=True)
    except Exception as exc:  # offline: URLError, a timeout, a checksum failure...
        die(f"could not load or download {name} into {os.path.abspath(data_dir)} ({type(exc).__name__}). Offline? "
            f"Put torchvision's {name} files there, or use --dataset folder --data-dir DIR (DIR/train/<class>/*.jpg) "
            f"or --dataset synthetic")


def read_image(path):
    """The RGB pixels (H, W, 3) uint8 of an image file, or None when PIL cannot decode it in full."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError:  # truncated, not an image (PIL's UnidentifiedImageError), unreadable
        return None


def left_out(bad, root, skip_bad):
    """Unreadable images stop the run in one line that counts and names them, or with skip_bad are left out."""
    if bad:
        what = f"{len(bad)} unreadable image{'s' * (len(bad) > 1)} in {root}: " + ", ".join(bad[:3]) + ", ..." * (
            len(bad) > 3)
        if not skip_bad:
            die(f"{what}; fix or delete {'them' if len(bad) > 1 else 'it'}, or pass --skip-bad-images to leave them "
                f"out")
        print(f"skipped: {what}", flush=True)


class UnlabelledFolder(torchvision.datasets.ImageFolder):
    """Every image under root, at any depth, with label -1 (one pseudo-class: root itself)."""
    find_classes = staticmethod(lambda root: ([], {"": -1}))


def image_folder(data_dir, split, transform, skip_bad=None):
    """ImageFolder at DATA_DIR/train for pretrain/train, DATA_DIR/test (or val) for test; without DATA_DIR/train, its
    images at any depth, label -1 and no classes, for every split. With skip_bad True or False every image is decoded
    once (in DataLoader workers for large folders), and unreadable ones stop the run or are left out; None: listed."""
    subs = ["train"] if split != "test" else ["test", "val"]
    unlabelled = os.path.isdir(data_dir) and not os.path.isdir(os.path.join(data_dir, "train"))
    path = data_dir if unlabelled else next((os.path.join(data_dir, sub) for sub in subs
                                             if os.path.isdir(os.path.join(data_dir, sub))), None)
    if path is None:
        die(f"no image folder at {os.path.join(os.path.abspath(data_dir), ' or '.join(subs))}: --dataset folder "
            f"expects DATA_DIR/train/<class>/*.jpg and DATA_DIR/test (or val)/<class>/*.jpg; set --data-dir")
    try:
        dataset = (UnlabelledFolder if unlabelled else torchvision.datasets.ImageFolder)(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        die(f"{path} holds no images ({exc}); expected {path}/{'**' if unlabelled else '<class>'}/<image>.jpg")
    if skip_bad is not None:
        key = (path, len(dataset.samples))
        if key not in UNREADABLE:  # an own generator: the run's random stream is left alone
            batches = torch.utils.data.DataLoader([p for p, _ in dataset.samples], batch_size=64,
                                                  num_workers=min(8, os.cpu_count()) if len(dataset) > 2000 else 0,
                                                  collate_fn=lambda ps: [p for p in ps if read_image(p) is None],
                                                  generator=torch.Generator())
            UNREADABLE[key] = [p for bad in batches for p in bad]
            left_out(UNREADABLE[key], path, skip_bad)
        gone = set(UNREADABLE[key])
        dataset.samples = dataset.imgs = [s for s in dataset.samples if s[0] not in gone]
        dataset.targets = [target for _, target in dataset.samples]
    return dataset


def first_image_size(dataset):
    """(width, height) of the first image of an ImageFolder whose header reads."""
    for path, _ in dataset.samples:
        with contextlib.suppress(OSError), Image.open(path) as image:
            return image.size
    die(f"no readable image in {dataset.root}")


def dataset_source(dataset, data_dir, image_size=None, synthetic_size=5000, skip_bad_images=False, eval_data_dir=None):
    """How to get a dataset: make(split, transform), a Dataset of split pretrain, train or test (train and test from
    eval_data_dir when given); the normalising mean and std; the crop size (image_size, else the dataset's: a folder's
    first image's shorter side, 224 above 96 px); name, data_dir, eval_dir, skip_bad_images (for tensor_pipeline.py)."""
    mean, std = NORMALIZATION.get(dataset, (None, None))
    labelled = dataset != "folder" or os.path.isdir(os.path.join(data_dir, "train"))
    if eval_data_dir and (labelled or not os.path.isdir(os.path.join(eval_data_dir, "train"))):
        die("--eval-data-dir DIR (DIR/train/<class>/*, DIR/test/<class>/*) evaluates a folder of unlabelled images")
    if not labelled:  # README: Your own images
        print(f"data: {data_dir} has no train/: its images at any depth, unlabelled; no online probe; kNN and linear "
              f"probe {'on ' + eval_data_dir if eval_data_dir else 'need labelled images (--eval-data-dir): skipped'}")
    if dataset == "synthetic":
        try:
            import synthetic
        except ImportError:
            die("--dataset synthetic needs synthetic.py beside common.py; use --dataset folder or cifar10")
        splits = synthetic.splits(synthetic_size)
        mean, std = synthetic.normalization(splits["train"][0])
        make = lambda split, transform: synthetic.ArrayImageDataset(*splits[split], transform)  # noqa: E731
    elif dataset == "folder":
        side = image_size or min(first_image_size(image_folder(data_dir, "pretrain", None)))
        image_size = side if side <= 96 else 224
        make = lambda split, transform: image_folder(  # noqa: E731
            data_dir if split == "pretrain" else eval_data_dir or data_dir, split, transform, skip_bad_images)
    else:
        make = lambda split, transform: torchvision_split(dataset, data_dir, split, transform)  # noqa: E731
    return SimpleNamespace(name=dataset, data_dir=data_dir, eval_dir=eval_data_dir or data_dir, make=make, mean=mean,
                           std=std, image_size=image_size or NATIVE_SIZE.get(dataset), skip_bad_images=skip_bad_images)


def loader_kwargs(num_workers, device):
    """Workers restart every epoch, seeded from the loader's generator (reseeded by set_data_epoch)."""
    return dict(num_workers=num_workers, pin_memory=device.startswith("cuda"), worker_init_fn=seed_worker)


# What build_data returns. A method's loop reads train_loader only: any iterable with len() that yields ((x1, x2),
# labels), two views (B, 3, H, W), works, a plain DataLoader included (with a `generator`, set_data_epoch makes resume
# exact). The eval loaders yield clean (images, labels) in order; eval_test_loader None: no labelled images. image_size
# (the crop size) and pipeline ("tensor" or "pil") are what was chosen, stored with the run for a resume to rebuild.
Data = collections.namedtuple("Data", "train_loader eval_train_loader eval_test_loader num_classes image_size mean std "
                                      "pipeline pretrain_labels")  # pretrain_labels: the online probe's, if any


def build_data(args, rank=0, world_size=1):
    """The pretraining loader (two augmented views per image) and clean loaders for evaluation: the tensor
    pipeline (tensor_pipeline.py) when it is beside this file and the dataset fits in memory, else torchvision's
    PIL transforms in DataLoader workers. Reads args, changes nothing. Under torchrun the pretraining loader yields
    process `rank`'s share of every global batch, with the views one process gives that share."""
    source = dataset_source(args.dataset, args.data_dir, args.image_size, args.synthetic_size, args.skip_bad_images,
                            args.eval_data_dir)
    if args.pipeline != "pil":
        try:
            import tensor_pipeline
        except ImportError:
            if args.pipeline == "tensor":
                die("--pipeline tensor needs tensor_pipeline.py beside common.py; use --pipeline pil")
            print("data: tensor_pipeline.py is not beside common.py; using the PIL pipeline")
        else:
            data = tensor_pipeline.build_data(source, args.pipeline, args.augmentations, args.batch_size,
                                              torch.device(args.device), rank, world_size, args.overlap, args.blur_p)
            if data is not None:
                return data
    print(f"data: PIL pipeline, torchvision transforms in {args.num_workers} DataLoader workers")
    views = Views(*augmentation_recipe(args.augmentations, source.image_size, source.mean, source.std, args.blur_p))
    clean = eval_transform(source.image_size, source.mean, source.std)
    pretrain_set, train_set, test_set = source.make("pretrain", views), source.make("train", clean), source.make(
        "test", clean)
    if len(pretrain_set) < args.batch_size:
        die(f"--batch-size {args.batch_size} is larger than the {len(pretrain_set)} training images")
    num_classes = len(train_set.classes)
    if len(train_set) > EVAL_TRAIN_IMAGES:  # kNN and the probes learn from at most EVAL_TRAIN_IMAGES
        train_set = torch.utils.data.Subset(train_set, evenly_spaced(len(train_set), EVAL_TRAIN_IMAGES).tolist())
    generator = torch.Generator().manual_seed(args.seed)  # the order and every image's seed; set_data_epoch reseeds
    train_loader = torch.utils.data.DataLoader(
        SeededImages(pretrain_set), batch_sampler=GlobalBatches(len(pretrain_set), args.batch_size, rank, world_size,
                                                                generator),
        generator=generator, **loader_kwargs(args.num_workers, args.device))
    eval_loader = lambda dataset: torch.utils.data.DataLoader(  # noqa: E731  own generator: evaluation
        dataset, batch_size=512, generator=torch.Generator(), **loader_kwargs(args.num_workers, args.device))
    return Data(train_loader, eval_loader(train_set), eval_loader(test_set) if test_set.classes else None,
                num_classes or 1, source.image_size, source.mean, source.std, "pil",  # 1: no labels
                bool(pretrain_set.classes))


class GlobalBatches(torch.utils.data.Sampler):
    """The PIL pipeline's batches of (image index, seed of its views): the epoch's order and a seed per position
    drawn from `generator` (the same in every process), then process `rank`'s share of each global batch; the
    last partial batch dropped. The views depend on neither the number of processes nor the workers."""

    def __init__(self, num_images, batch_size, rank, world_size, generator):
        self.num_images, self.batch_size, self.generator = num_images, batch_size, generator
        self.share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)

    def __len__(self):
        return self.num_images // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.num_images, generator=self.generator).tolist()
        seeds = torch.randint(2**62, (self.num_images,), generator=self.generator).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield [(order[i], seeds[i]) for i in range(start, start + self.batch_size)[self.share]]


class SeededImages(torch.utils.data.Dataset):
    """dataset[(index, seed)] is dataset[index] with its transform's random draws seeded by seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        with torch.random.fork_rng(devices=[]):  # the process's own random stream is left alone
            torch.manual_seed(item[1])  # the CPU generator torchvision's transforms draw from
            return self.dataset[item[0]]


def set_data_epoch(train_loader, seed, epoch):
    """Reseed the loader's generator, if it has one: epoch e sees the same order and views, resumed or not."""
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(seed * 100_003 + epoch)


def epoch_batches(train_loader, seed, epoch, global_step):
    """The batches of `epoch` still to train: the loader reseeded for the epoch, less the steps a run resumed
    mid-epoch has trained. Those are still drawn (loaded and augmented), since the draws of the batches after
    them follow theirs in the loader's own generator: a resume costs their loading, not their training."""
    set_data_epoch(train_loader, seed, epoch)
    done = max(0, global_step - epoch * len(train_loader))
    batches = iter(train_loader if done < len(train_loader) else ())  # all done: only the evaluation is left
    for _ in itertools.islice(batches, done):
        pass
    return batches


# ---- The run folder and checkpoints: each file written whole, or not at all ----------------------
def claim_run_folder(args, is_main=True):
    """The run's folder: a resumed run's own, or a new one. The process that saves creates a new one here, in one
    step that fails if it exists (os.makedirs), so a run never writes into another's, even one started at once;
    a run that ends before writing into it (bad data, say) removes it again, so its name stays free."""
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    run_dir = os.path.join(args.out_dir, args.run_name)
    try:
        if is_main:
            os.makedirs(run_dir)
            atexit.register(lambda: os.path.isdir(run_dir) and not os.listdir(run_dir) and os.rmdir(run_dir))
    except FileExistsError:
        if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
            die(f"{run_dir} holds a run already; continue it with `python {args.method}.py --resume "
                f"{os.path.join(run_dir, 'checkpoint.pt')}`, or start over under another --run-name (or delete it)")
        die(f"{run_dir} exists already; choose another --run-name (or delete {run_dir})")
    except NotADirectoryError:
        die(f"--out-dir {args.out_dir} is a file; name a folder (it is created if missing)")
    except OSError as exc:
        write_failed(run_dir, exc)
    return run_dir


def write_failed(path, exc):
    """One line naming the path and the cause (disk full, no permission, read-only...), exit code 1."""
    while exc is not None and not isinstance(exc, OSError):  # torch.save raises a RuntimeError from the OSError
        exc = exc.__cause__ or exc.__context__
    die(f"could not write {path}: {exc.strerror or exc if exc else 'the writer failed'}; any earlier version of it "
        f"is intact", code=1)


def atomic_write(path, mode, write):
    """write(f) into a temporary file beside path, flushed to disk, then renamed over path: a crash or a failed
    write leaves the earlier file intact and no temporary file, and a failed write is one line (write_failed)."""
    try:
        with tempfile.NamedTemporaryFile(mode, dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:  # also a second Ctrl-C in the middle of the write
                os.remove(f.name)
                raise
        os.replace(f.name, path)
    except (OSError, RuntimeError) as exc:
        write_failed(path, exc)


def atomic_save(obj, path):
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def rng_states():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    np.random.set_state((states["numpy"][0], np.array(states["numpy"][1], dtype=np.uint32), *states["numpy"][2:]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(path):
    """A checkpoint.pt's contents, or one line saying why not."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        die(f"could not read {path}: it is corrupt or not a checkpoint of this project ({type(exc).__name__})")
    if not isinstance(state, dict):
        die(f"{path} is not a checkpoint of this project")
    return state


def resume(path, model, optimizer, scaler):
    """Restore a run in place from its checkpoint; returns (completed epochs, global step)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    print(f"resumed {path} at epoch {state['epoch']}, step {state['global_step']}")
    return state["epoch"], state["global_step"]


# ---- The run: its records, its checkpoints, and how it stops -------------------------------------
class Run:
    """What the loop records and saves. is_main: this process saves, logs and evaluates (the one process; under
    torchrun rank 0, while the others wait). It writes into run_dir: args.json (a new run's arguments), a JSON
    line per log step and evaluation in metrics.jsonl, checkpoint.pt every epoch, backbone.pt at the end.
    train_step runs every step but reads the loss terms (a host sync) every --log-every steps only; images/s
    and the ETA are measured over that window, time outside the steps (evaluation, checkpoints) left out."""

    def __init__(self, args, run_dir, is_main, model, optimizer, scaler, data, device):
        self.args, self.run_dir, self.is_main, self.model, self.optimizer = args, run_dir, is_main, model, optimizer
        self.scaler, self.data, self.device, self.saved = scaler, data, device, None  # saved: (epoch, step)
        self.steps_per_epoch = len(data.train_loader) if data is not None else 1
        self.total_steps, self.metrics = args.epochs * self.steps_per_epoch, os.path.join(run_dir, "metrics.jsonl")
        self.window_start, self.window_steps, self.events = time.perf_counter(), 0, None
        try:  # every number of metrics.jsonl in TensorBoard's event files too (tensorboard --logdir runs)
            from torch.utils.tensorboard import SummaryWriter
            self.events = SummaryWriter(run_dir) if is_main else None
        except ImportError:
            if is_main:
                print("tensorboard is not installed: metrics.jsonl alone (pip install tensorboard for event files)")
        if is_main and not args.resume:
            atomic_write(os.path.join(run_dir, "args.json"), "w",
                         lambda f: json.dump({**vars(args), "command": " ".join(sys.argv)}, f, indent=2))

    def write(self, record):
        if self.is_main:
            try:
                with open(self.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as exc:
                write_failed(self.metrics, exc)
        if self.events:  # TensorBoard: tag type/key at the record's step
            for key in (key for key in record if key not in ("type", "step")):
                self.events.add_scalar(f"{record['type']}/{key}", record[key], record["step"])
            self.events.flush()

    def log_due(self, global_step):
        """Whether train_step(global_step) logs: every --log-every steps and at the last step."""
        return global_step % self.args.log_every == 0 or global_step == self.total_steps

    def train_step(self, epoch, global_step, terms, lr):
        self.window_steps += 1
        if not self.log_due(global_step):
            return
        values = mean_over_processes({k: float(torch.as_tensor(v).detach()) for k, v in terms.items()})  # torchrun
        if not all(math.isfinite(v) for v in values.values()):
            die(f"loss is {values} at step {global_step} (epoch {epoch + 1}): training diverged. Lower --base-lr or "
                f"use --precision fp32; the last checkpoint is kept", code=1)
        now = time.perf_counter()
        elapsed = now - self.window_start
        images_per_s = self.window_steps * self.args.batch_size / elapsed
        eta = int((self.total_steps - global_step) * elapsed / self.window_steps)
        eta = f"{eta // 3600}h{eta // 60 % 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"
        self.window_start, self.window_steps = now, 0
        self.write({"type": "train", "epoch": epoch + 1, "step": global_step, **values, "lr": lr,
                    "images_per_s": images_per_s})
        print(f"epoch {epoch + 1}/{self.args.epochs} step {global_step - epoch * self.steps_per_epoch}/"
              f"{self.steps_per_epoch} | {' '.join(f'{k} {v:.4f}' for k, v in values.items())} | lr {lr:.3g} | "
              f"{images_per_s:.0f} img/s | eta {eta}", flush=True)

    def evaluation(self, epoch, global_step, results):
        """One evaluation after `epoch` (0-based; -1 is the untrained backbone, logged as epoch 0)."""
        self.write({"type": "eval", "epoch": epoch + 1, "step": global_step, **results})
        print(f"eval epoch {epoch + 1}: " + " | ".join(f"{k} {v:.2f}" for k, v in results.items()), flush=True)

    def save(self, epoch, global_step):
        """checkpoint.pt: everything the run needs to continue exactly; epoch counts the completed epochs."""
        atomic_save({"method": self.args.method, "model": self.model.state_dict(), "args": vars(self.args),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                     "global_step": global_step, "rng": rng_states()}, os.path.join(self.run_dir, "checkpoint.pt"))
        self.saved = (epoch, global_step)

    def resume_hint(self):
        """How to continue, from what this process knows (it runs in signal handlers: no reading of files)."""
        if not self.is_main:
            return "see the first process's message"
        if self.saved is None and not self.args.resume:
            return f"no checkpoint was written yet: start again (delete {self.run_dir} first)"
        at = f" (epoch {self.saved[0]}, step {self.saved[1]})" if self.saved else ""
        return (f"continue from the checkpoint{at} with `python {self.args.method}.py --resume "
                f"{os.path.relpath(os.path.join(self.run_dir, 'checkpoint.pt'))}`")

    def stop_if_signalled(self, epoch, global_step):
        """After a step (and an epoch's evaluation): if SIGINT or SIGTERM came, a checkpoint at this step (epoch:
        the completed epochs), the command that resumes it, and exit 128 + the signal's number."""
        signum = signalled_anywhere(SIGNALLED[0] if SIGNALLED else 0)  # torchrun: every process stops here
        if signum:
            if self.is_main:
                self.save(epoch, global_step)
                print(f"error: stopped by {signal.Signals(signum).name}; {self.resume_hint()}", file=sys.stderr)
            raise SystemExit(128 + signum)

    def end_of_epoch(self, epoch, global_step):
        """checkpoint.pt (and after the last epoch backbone.pt), then the evaluation every --eval-every epochs and
        at the end, with the fast linear probe at the end. Returns the evaluation, or None."""
        started, last, results = time.perf_counter(), epoch + 1 == self.args.epochs, None
        if self.is_main:
            self.save(epoch + 1, global_step)
            if last:
                atomic_save(self.model["backbone"].state_dict(), os.path.join(self.run_dir, "backbone.pt"))
            if (epoch + 1) % self.args.eval_every == 0 or last:
                results = evaluate(self.model, self.data, self.device, linear=last)
                self.evaluation(epoch, global_step, results)
        if last and self.is_main:
            with open(self.metrics) as f:
                before = next((r for r in map(json.loads, f) if r["type"] == "eval" and r["epoch"] == 0), {})
            untrained = f"{before['knn_top1']:.1f}% untrained -> " if "knn_top1" in before else ""
            checkpoint = os.path.relpath(os.path.join(self.run_dir, "checkpoint.pt"))
            print((f"kNN top-1 (weighted, k=200, clean test images): {untrained}{results['knn_top1']:.1f}% after "
                   f"{self.args.epochs} epochs; linear probe (fast, cached features) {results['linear_top1']:.1f}%\n"
                   if "knn_top1" in results else "") +
                  f"done: {self.run_dir}/checkpoint.pt, backbone.pt, metrics.jsonl\nnext: `python eval_linear.py "
                  f"--checkpoint {checkpoint}` (linear probes, README: Evaluation), `python spectrum.py {checkpoint}` "
                  f"(the spectra), `python {self.args.method}.py --dataset cifar10` (the full recipe, a GPU), or "
                  f"`--dataset folder --data-dir DIR` for your own images")
        if not last:
            self.stop_if_signalled(epoch + 1, global_step)  # a signal during the evaluation
        self.window_start += time.perf_counter() - started
        return results


SIGNALLED = []  # the signals received since stop_safely began


@contextlib.contextmanager
def stop_safely(run):
    """Around the training and the evaluation before it. The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's
    notice before preemption) lets the current step finish, and Run.stop_if_signalled writes a checkpoint at that
    step; a second one stops at once. Out of GPU memory, or a data file gone or unreadable, ends in one line
    with what to do (exit 1); any other exception is a bug in the code and shows Python's traceback. Either
    way, the last checkpoint is intact."""
    def on_signal(signum, frame):
        SIGNALLED.append(signum)
        name = signal.Signals(signum).name
        if len(SIGNALLED) > 1:
            print(f"error: {name} again: stopped at once; {run.resume_hint()}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        print(f"\n{name}: finishing this step, then writing a checkpoint (send it again to stop at once)", flush=True)

    SIGNALLED.clear()
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        die(f"out of memory on {run.args.device}; free the GPU (another process?) and resume, or start over with a "
            f"smaller --batch-size; {run.resume_hint()}", code=1)
    except OSError as exc:  # a DataLoader worker's error ends with its cause
        die(f"could not read the data ({(str(exc).strip().splitlines() or [''])[-1]}); check --data-dir, then "
            f"resume; {run.resume_hint()}", code=1)
    except Exception as exc:
        if not peer_lost(exc):  # torchrun: distributed.py says that one in one line
            print(f"error: the code raised an exception (its traceback follows); once fixed, {run.resume_hint()}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
