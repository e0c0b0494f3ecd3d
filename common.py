# What every method file shares, in the order a reader of a method file needs it: the backbone and
# heads, the augmentation recipes, the orthogonality penalties, optimisation and evaluation; then,
# below the PLUMBING banner, flags, data loading, checkpoints and logging. It needs no other file
# from the project: a method file plus this one, copied into another project, train on an
# ImageFolder tree or torchvision's datasets. Optional modules beside it add speed, an offline data
# set and torchrun: tensor_pipeline.py (batched augmentation on the GPU), synthetic.py, distributed.py.
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import sys
import time
import traceback
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


def build_backbone(arch, image_size, stem_padding=2):
    """Returns (backbone, feature_dim). Backbone maps (B, 3, H, W) images to (B, feature_dim).
    At 64 px or less the CIFAR stem replaces the 7x7/2 conv and max-pool, which lose most of 32 px:
    a 3x3/1 conv with padding 2, so 32 px inputs give 34x34 maps (solo-learn fca55e3
    solo/methods/base.py; INTL 0aa69af src/resnet.py pads 1 before a padding-1 conv, the same).
    Runs saved before this stem used padding 1 (their stored stem_padding)."""
    if arch == "convnet":
        return small_convnet(), 256
    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
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


# ---- Augmentation recipes: two views of every image, each with its own random draws --------------
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


class TwoViews:
    """Turns one image into the pair (view1(image), view2(image)), each with its own randomness."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, image):
        return self.view1(image), self.view2(image)


# Per-view settings of the CIFAR configs behind the published numbers (solo-learn fca55e3: bash_files/
# pretrain/cifar/*.sh, solo/args/{dataset,utils}.py; INTL 0aa69af cifar/transform.py).
AUGMENTATION_RECIPES = {
    # SimCLR: strong jitter; blur 0.5 (solo-learn's default, not switched off by its CIFAR script until e90d420)
    "symmetric": [dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5)] * 2,
    # BYOL, INTL: solarisation on the second view only; blur 1.0 / 0.1 above 64 px only (recipe_settings)
    "asymmetric": [dict(solarize_p=0.0), dict(solarize_p=0.2)],
    # VICReg: milder crops, solarisation 0.1 and blur 0.5 on both views
    "vicreg": [dict(crop_scale=(0.2, 1.0), solarize_p=0.1, blur_p=0.5)] * 2,
}
AUGMENTATIONS = tuple(AUGMENTATION_RECIPES)


def recipe_settings(name, crop_size, blur_p=None):
    """The keyword settings of each view of a named recipe, for images of crop_size pixels; blur_p, when
    given (--blur-p), replaces the blur probability of both views."""
    view1, view2 = (dict(settings) for settings in AUGMENTATION_RECIPES[name])
    if crop_size > 64 and view1 != view2:  # the asymmetric pair blurs only above 64 px (solo-learn)
        view1["blur_p"], view2["blur_p"] = 1.0, 0.1
    if blur_p is not None:
        view1["blur_p"] = view2["blur_p"] = blur_p
    return view1, view2


def augmentation_recipe(name, crop_size, mean, std, blur_p=None):
    """The two PIL view transforms of a named recipe, for images of crop_size pixels."""
    return tuple(view_transform(crop_size, mean, std, **view) for view in recipe_settings(name, crop_size, blur_p))


def eval_transform(image_size, mean, std):
    """Clean images for evaluation: resize the shorter side, centre crop, normalise."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
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
    """lars: biases and norm parameters (ndim <= 1) get neither weight decay nor trust scaling, as
    in solo-learn's CIFAR configs. sgd: momentum 0.9, weight decay on every parameter. The online
    probe (model["online_probe"], if any) trains in the same optimiser and schedule, at probe_lr at
    the schedule's peak and without weight decay (solo-learn fca55e3 solo/methods/base.py)."""
    probe = set(model["online_probe"].parameters()) if "online_probe" in model else set()
    params = [p for p in model.parameters() if p.requires_grad and p not in probe]
    ratio = (probe_lr or lr) / lr
    probe_groups = [{"params": [p for p in probe if p.ndim > 1], "weight_decay": 0.0, "lr_ratio": ratio},
                    {"params": [p for p in probe if p.ndim <= 1], "weight_decay": 0.0, "lr_ratio": ratio,
                     "lars": False}]
    if name == "sgd":
        groups = [{"params": params}] + [{k: v for k, v in g.items() if k != "lars"} for g in probe_groups]
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
@torch.no_grad()
def extract_features(backbone, loader, device):
    """Backbone features of every image in loader, in eval mode: (N, F) float32 and (N,) labels."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
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
        votes = (top_similarity / temperature).exp() if weighted else torch.ones_like(top_similarity)
        scores = torch.zeros(len(chunk), num_classes, dtype=votes.dtype, device=votes.device)
        scores.scatter_add_(1, train_labels[top_index], votes)                # (C, classes)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


def accuracy(predictions, labels):
    return (predictions == labels).float().mean().item() * 100


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes, epochs=100,
                 batch_size=256, lr=1e-3, weight_decay=1e-6, seed=0):
    """A linear classifier trained on frozen, standardised features (Adam, cosine schedule).
    Returns (top1, top5) test accuracy in %."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    classifier = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)  # a convex problem: zero init makes the probe deterministic
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    step = 0
    for _ in range(epochs):
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            set_lr(optimizer, warmup_cosine(step, epochs * steps_per_epoch, 0, lr))
            loss = F.cross_entropy(classifier(train_x[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        top5 = classifier(test_x).topk(min(5, num_classes), dim=1).indices  # (N, 5)
    top1 = accuracy(top5[:, 0], test_labels)
    return top1, (top5 == test_labels[:, None]).any(dim=1).float().mean().item() * 100


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
    """On clean features: weighted kNN (k=200), 5-NN (cosine, and INTL's Euclidean), the online
    probe's accuracy (when the model has one), collapse diagnostics of the representation and the
    projector output, the mean orthogonality error of the regularised layers (the backbone's when the
    model has no regularizer), and optionally the fast linear probe."""
    train_features, train_labels = extract_features(model["backbone"], data.eval_train_loader, device)
    test_features, test_labels = extract_features(model["backbone"], data.eval_test_loader, device)
    knn = lambda **kw: accuracy(knn_predict(  # noqa: E731
        train_features, train_labels, test_features, data.num_classes, **kw), test_labels)
    results = {"knn_top1": knn(k=200, temperature=0.1), "knn5_top1": knn(k=5, weighted=False),
               "knn5_euclidean_top1": knn(k=5, weighted=False, metric="euclidean")}
    if "online_probe" in model:
        with torch.no_grad():
            top5 = model["online_probe"](test_features.to(device)).topk(min(5, data.num_classes), dim=1).indices.cpu()
        results["online_top1"] = accuracy(top5[:, 0], test_labels)
        results["online_top5"] = (top5 == test_labels[:, None]).any(dim=1).float().mean().item() * 100
    projector, was_training = model["projector"], model["projector"].training
    with torch.no_grad():  # projector output of the cached clean features, (N, D)
        z = torch.cat([projector.eval()(h.to(device)).float().cpu() for h in train_features.split(4096)])
    projector.train(was_training)
    for name, values in (("rep", train_features), ("proj", z)):
        stats = embedding_stats(values)
        results[f"{name}_erank"], results[f"{name}_std"] = stats["erank"], stats["std"]
    layers = model["ortho"].layers if "ortho" in model else model["backbone"]
    results["ortho_error"] = orthogonality_error(layers)
    if linear:
        results["linear_top1"], results["linear_top5"] = linear_probe(
            train_features, train_labels, test_features, test_labels, data.num_classes)
    return results


# ##############################################################################################
# PLUMBING: flags, seeding, data loading, checkpoints and logging. Nothing here is a method's
# maths; read it when something about a run (not a result) surprises you.
# ##############################################################################################

# ---- Flags ---------------------------------------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
RESUME_OVERRIDABLE = ("device", "num_workers", "data_dir", "log_every", "skip_bad_images")


def die(message, code=2):
    """End a run with one readable line: exit code 2 for bad input (flags, data, run folder), 1 for a
    failure while running (a write that fails, out of memory)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # torchrun: one line per machine, not one per process
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Bounded:
    """argparse type: a number of `kind` (int or float) within bounds, e.g. Bounded(float, gt=0) for > 0,
    Bounded(int, ge=1), Bounded(float, ge=0, le=1). Every numeric flag has one (a test checks), so any
    value out of range ends the parse in one line that names the valid range, exit code 2."""

    def __init__(self, kind, gt=None, ge=None, le=None):
        self.kind, self.gt, self.ge, self.le = kind, gt, ge, le
        bounds = [f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<=", le)) if v is not None]
        self.valid = ("an integer " if kind is int else "a number ") + " and ".join(bounds)

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (self.gt is not None and value <= self.gt) or \
                (self.ge is not None and value < self.ge) or (self.le is not None and value > self.le):
            raise argparse.ArgumentTypeError(f"expected {self.valid}, got {text}")
        return value

    def __repr__(self):
        return self.valid


positive_int = Bounded(int, ge=1)


def parse_or_die(parser, argv):
    """parser.parse_args(argv), with any error (unknown flag, bad choice, value out of range) as one line, exit 2."""
    parser.error = lambda message: die(f"{message} (see --help)")
    return parser.parse_args(argv)


def add_recipe_args(parser, *, epochs, batch_size, optimizer, base_lr, weight_decay, warmup_epochs,
                    final_lr_ratio, augmentations, probe_lr):
    """The optimisation and augmentation flags of every method, with its recipe as their defaults: each
    method file calls this with its real values, so the recipe reads at a glance."""
    add = parser.add_argument_group("recipe (defaults: this method's reference configuration)").add_argument
    add("--epochs", type=positive_int, default=epochs, help="pretraining epochs (default: %(default)s)")
    add("--batch-size", type=Bounded(int, ge=2), default=batch_size,
        help="images per step, two views each; at least 2, which BatchNorm and the losses compare "
             "(default: %(default)s)")
    add("--optimizer", choices=("lars", "sgd"), default=optimizer,
        help="lars: biases and norms excluded from weight decay and trust scaling; sgd: momentum 0.9, decay on "
             "every parameter (default: %(default)s)")
    add("--base-lr", type=Bounded(float, gt=0), default=base_lr,
        help="lr at batch 256; peak lr = base-lr x batch / 256 (default: %(default)s)")
    add("--weight-decay", type=Bounded(float, ge=0), default=weight_decay,
        help="L2 weight decay (default: %(default)s)")
    add("--warmup-epochs", type=Bounded(int, ge=0), default=warmup_epochs,
        help="linear warm-up, then a cosine, per step (default: %(default)s, at most a tenth of --epochs unless given)")
    add("--final-lr-ratio", type=Bounded(float, ge=0, le=1), default=final_lr_ratio,
        help="the cosine ends at this fraction of the peak lr (default: %(default)s)")
    add("--augmentations", choices=AUGMENTATIONS, default=augmentations,
        help="named two-view recipe of the published configs, see README (default: %(default)s)")
    add("--blur-p", type=Bounded(float, ge=0, le=1), default=None,
        help="probability of the Gaussian blur on both views, replacing the recipe's (default: the recipe's)")
    add("--probe-lr", type=Bounded(float, gt=0), default=probe_lr,
        help="peak lr of the online linear probe, not scaled by the batch, no weight decay (default: %(default)s)")


def add_common_args(parser):
    """The infrastructure flags every method shares: data, device, precision, pipeline, logging, run
    folder, resume and the orthogonality regularizer."""
    add = parser.add_argument_group("data").add_argument
    add("--dataset", choices=DATASETS, default="cifar10",
        help="cifar10/cifar100/stl10 download into --data-dir; folder reads DATA_DIR/train and DATA_DIR/test (or "
             "val) as ImageFolders; synthetic is generated offline (default: %(default)s)")
    add("--data-dir", default="./data", help="where datasets are read or downloaded (default: %(default)s)")
    add("--synthetic-size", type=Bounded(int, ge=10), default=5000,
        help="training images of --dataset synthetic; the test set is a fifth (default: %(default)s)")
    add("--image-size", type=Bounded(int, ge=8), default=None,
        help="crop size (default: the dataset's: 32 CIFAR, 96 STL-10, a folder's first image)")
    add("--pipeline", choices=("auto", "tensor", "pil"), default="auto",
        help="tensor: uint8 images in memory on the training device, augmented in batches (tensor_pipeline.py); "
             "pil: torchvision transforms in DataLoader workers; auto: tensor when it fits (default: %(default)s)")
    add("--num-workers", type=Bounded(int, ge=0), default=min(8, torch.get_num_threads()),
        help="data loading processes of the pil pipeline (default: %(default)s, the CPU threads up to 8)")
    add("--overlap", action="store_true",
        help="tensor pipeline: augment the next batch while this step runs (on a GPU, on a side CUDA stream); the "
             "same batches either way (default: off)")
    add("--skip-bad-images", action="store_true",
        help="train without the unreadable images of a --dataset folder (default: stop and list them)")
    add = parser.add_argument_group("run").add_argument
    add("--arch", choices=ARCHS, default="resnet18",
        help="backbone; convnet is a 4-layer net for quick CPU checks only (default: %(default)s)")
    add("--device", default="auto", help="cuda, cpu or auto (default: %(default)s)")
    add("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
        help="autocast dtype of the forward pass; losses stay fp32 (default: %(default)s: bf16 on a GPU, else fp32)")
    add("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"), default=None,
        metavar="MODE", help="torch.compile the backbone (slow start, faster steps on a GPU); MODE default, "
                             "reduce-overhead (CUDA graphs) or max-autotune (default: off; MODE default: default)")
    add("--seed", type=Bounded(int, ge=0, le=2**32 - 1), default=0,
        help="seeds python, numpy, torch and the data order (default: %(default)s)")
    add("--eval-every", type=positive_int, default=None,
        help="kNN every N epochs and at the end (default: a tenth of --epochs)")
    add("--log-every", type=positive_int, default=50, help="progress line every N steps (default: %(default)s)")
    add("--out-dir", default="runs", help="parent folder of run folders (default: %(default)s)")
    add("--run-name", default=None, help="run folder name (default: method-dataset-arch-seed-time)")
    add("--resume", default=None, metavar="PATH",
        help="continue from a checkpoint.pt with its stored arguments (only --device, --num-workers, --data-dir, "
             "--log-every and --skip-bad-images may change)")
    add = parser.add_argument_group("orthogonality regularization (He, Du, Ma, NeurIPS 2024)").add_argument
    add("--ortho", choices=ORTHO_KINDS, default="none",
        help="penalty on the backbone's conv and linear weights: so = soft orthogonality, srip = spectral norm of "
             "W^T W - I (default: %(default)s)")
    add("--ortho-weight", type=Bounded(float, ge=0), default=None,
        help="weight of the --ortho penalty (default: 1e-6 for so, 1e-3 for srip, the paper's ResNet values)")
    add("--ortho-heads", action="store_true", help="regularise the projector and predictor too, not only the backbone")


def parse_run_args(parser, argv, method, offline_check):
    """Parse argv (None: the command line) and return args, with the defaults that depend on other
    flags filled in and the combination checked.

    --dataset synthetic is the quick offline check: the method's `offline_check` settings (e.g. the
    convnet for 40 epochs) replace the recipe's defaults there, and flags given on the command line
    still win. --warmup-epochs, when not given, is capped at a tenth of --epochs; --eval-every
    defaults to a tenth of --epochs. --resume takes every argument from the checkpoint except
    RESUME_OVERRIDABLE.
    """
    parser.epilog = ("--dataset synthetic (the offline check) changes these defaults: "
                     + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in offline_check.items()))
    args = parse_or_die(parser, argv)
    if args.dataset == "synthetic":  # parsed again with the offline check's defaults
        parser.set_defaults(**offline_check)
        args = parser.parse_args(argv)
    if args.resume:
        typed = {k: v for k, v in vars(args).items() if k != "resume" and v != parser.get_default(k)}
        refused = sorted("--" + k.replace("_", "-") for k in set(typed) - set(RESUME_OVERRIDABLE))
        if refused:
            die(f"--resume continues a run with its stored arguments; only --device, --num-workers, --data-dir, "
                f"--log-every and --skip-bad-images may change, not {', '.join(refused)}")
        stored = load_checkpoint(args.resume)
        if stored.get("method") != method or "args" not in stored:
            die(f"{args.resume} is not a {method}.py training checkpoint "
                f"(written by {stored.get('method', 'something else')}); resume it with that script")
        older = {"ortho": "none", "ortho_weight": 0.0, "ortho_heads": False,  # runs saved before these flags existed
                 "pipeline": "pil", "compile": None, "overlap": False, "blur_p": None, "stem_padding": 1,
                 "skip_bad_images": False}
        args = SimpleNamespace(**{**older, **stored["args"], **typed, "resume": args.resume})
    else:
        if args.warmup_epochs == parser.get_default("warmup_epochs"):  # the reference value, for short runs
            args.warmup_epochs = min(args.warmup_epochs, args.epochs // 10)
        args.eval_every = args.eval_every or max(1, args.epochs // 10)
        if args.ortho == "none" and args.ortho_weight:
            die(f"--ortho-weight {args.ortho_weight:g} has no effect without --ortho so or --ortho srip")
        if args.ortho_weight is None:
            args.ortho_weight = ORTHO_WEIGHTS[args.ortho]
        args.method, args.stem_padding = method, 2  # stored: runs saved before the 34 px stem used 1
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.run_name = args.run_name or f"{method}-{args.dataset}-{args.arch}-s{args.seed}-{stamp}"
        check_new_run_folder(args.out_dir, args.run_name, method)
    args.device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, args.device)
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        die("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if args.warmup_epochs > args.epochs:
        die(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}; "
            f"pass --warmup-epochs {args.epochs // 10} or fewer")
    return args


def check_new_run_folder(out_dir, run_name, method):
    """A new run never writes into a folder that holds files: an earlier run's checkpoint is resumed or
    kept, never overwritten."""
    run_dir = os.path.join(out_dir, run_name)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out-dir {out_dir} is a file; name a folder (it is created if missing)")
    if os.path.basename(run_name) != run_name or run_name in (".", ".."):
        die(f"--run-name {run_name} must be a plain folder name; put the parent folder in --out-dir")
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        die(f"{run_dir} holds a run already; continue it with `python {method}.py --resume "
            f"{os.path.join(run_dir, 'checkpoint.pt')}`, or start over under another --run-name (or delete {run_dir})")
    if os.path.exists(run_dir) and (not os.path.isdir(run_dir) or os.listdir(run_dir)):
        die(f"{run_dir} exists and is not an empty folder; choose another --run-name (or delete {run_dir})")


def resolve_device(name):
    """'auto' -> cuda when torch sees a GPU, else cpu; cpu, cuda, cuda:N or mps, else an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        die(f"--device {name} is not a device this code runs on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name} was asked for but torch sees no GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        die(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    if device.type == "mps" and not torch.backends.mps.is_available():
        die(f"--device {name} was asked for but torch sees no Apple GPU; use --device cpu")
    return name


def resolve_precision(precision, device):
    """'auto' -> bf16 autocast on a GPU, fp32 on the CPU (where bf16 convolutions are slow)."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


# ---- Seeding and the device ----------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id):
    # DataLoader gives each worker torch seed = base_seed + worker_id; derive python/numpy from it,
    # otherwise forked workers would share the parent's python and numpy RNG states.
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole process group: the main process
        signal.signal(signum, signal.SIG_IGN)      # finishes its step and stops the workers itself


def prepare_model(model, device, compile=None):
    """The GPU fast path: channels_last weights (with channels_last inputs, cuDNN's tensor-core
    kernels need no layout changes) and, with --compile MODE, every backbone compiled in place in that
    torch.compile mode (state dict names unchanged, so checkpoints load with or without it)."""
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if compile:
        for name, module in model.named_modules():
            if name.endswith("backbone"):
                module.compile(mode="default" if compile is True else compile)  # True: a run saved before MODE
    return model


# ---- Many processes: torchrun --nproc_per_node N METHOD.py, the same steps as one process ----------
# distributed.py (optional, beside this file) holds the torchrun plumbing; without it, or in one process,
# gather, average_gradients, sync_batch_norm, mean_over_processes and signalled_anywhere change nothing.
try:
    from distributed import (average_gradients, gather, join_processes, mean_over_processes, signalled_anywhere,
                             sync_batch_norm)
except ImportError:
    join_processes = None
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


# ---- Data loading --------------------------------------------------------------------------------
# Per-channel mean and std of each training set. `folder` uses ImageNet's; `synthetic` is measured
# on the generated images.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": 32}


def torchvision_split(name, data_dir, split, transform):
    """One split of a torchvision dataset, downloaded into data_dir if missing."""
    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            return cls(data_dir, train=split != "test", transform=transform, download=True)
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        return torchvision.datasets.STL10(data_dir, split=stl_split, transform=transform, download=True)
    except Exception as exc:  # offline: URLError, a timeout, a checksum failure...
        die(f"could not load or download {name} into {os.path.abspath(data_dir)} "
            f"({type(exc).__name__}). Offline? Put torchvision's {name} files there, or use "
            f"--dataset folder --data-dir DIR (DIR/train/<class>/*.jpg) or --dataset synthetic")


def unreadable(paths):
    """Those of paths that PIL cannot decode in full: truncated, not an image, unreadable."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
        except OSError:  # PIL's UnidentifiedImageError is one
            bad.append(path)
    return bad


UNREADABLE = {}  # (folder, number of images) -> its unreadable images: each folder is decoded once per process


def drop_unreadable(dataset, skip_bad):
    """Decode every image of an ImageFolder once (in DataLoader workers for large folders). Unreadable ones
    end the run in one line that counts and lists them, or with skip_bad are left out of the dataset."""
    key = (dataset.root, len(dataset.samples))
    if key not in UNREADABLE:
        workers = min(8, os.cpu_count() or 1) if len(dataset) > 2000 else 0
        paths = torch.utils.data.DataLoader([path for path, _ in dataset.samples], batch_size=64, num_workers=workers,
                                            collate_fn=unreadable,  # decoded in the workers; an own generator
                                            generator=torch.Generator())  # leaves the run's random stream alone
        UNREADABLE[key] = [path for bad in paths for path in bad]
        if UNREADABLE[key] and skip_bad:
            print(f"skipped: {bad_images_message(UNREADABLE[key], dataset.root).split('; ')[0]}", flush=True)
    if UNREADABLE[key] and not skip_bad:
        die(bad_images_message(UNREADABLE[key], dataset.root))
    gone = set(UNREADABLE[key])
    dataset.samples = dataset.imgs = [sample for sample in dataset.samples if sample[0] not in gone]
    dataset.targets = [target for _, target in dataset.samples]
    return dataset


def bad_images_message(paths, root):
    """One line: how many images of root are unreadable, the first three, and what to do."""
    listed = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    return (f"{len(paths)} unreadable image{'s' * (len(paths) > 1)} in {root}: {listed}; fix or delete "
            f"{'them' if len(paths) > 1 else 'it'}, or pass --skip-bad-images to leave them out")


def first_image_size(dataset):
    """(width, height) of the first image of an ImageFolder whose header reads."""
    for path, _ in dataset.samples:
        with contextlib.suppress(OSError), Image.open(path) as image:
            return image.size
    die(f"no readable image in {dataset.root}")


def image_folder(data_dir, split, transform, skip_bad=None):
    """ImageFolder at DATA_DIR/train for pretrain/train, DATA_DIR/test (or val) for test. skip_bad None
    lists the images only; True or False also decodes them all once (drop_unreadable)."""
    candidates = ["train"] if split != "test" else ["test", "val"]
    for sub in candidates:
        path = os.path.join(data_dir, sub)
        if os.path.isdir(path):
            try:
                dataset = torchvision.datasets.ImageFolder(path, transform=transform)
            except (FileNotFoundError, RuntimeError) as exc:
                die(f"{path} holds no images in class folders ({exc}); "
                    f"expected {path}/<class>/<image>.jpg")
            return dataset if skip_bad is None else drop_unreadable(dataset, skip_bad)
    die(f"no image folder at {os.path.join(os.path.abspath(data_dir), ' or '.join(candidates))}: "
        f"--dataset folder expects DATA_DIR/train/<class>/*.jpg and DATA_DIR/test (or val)/<class>/*.jpg; "
        f"set --data-dir")


def folder_image_size(data_dir):
    """Shorter side of the first training image; images above 64 px are trained at 224."""
    side = min(first_image_size(image_folder(data_dir, "train", None)))
    return side if side <= 96 else 224


def dataset_source(dataset, data_dir, image_size=None, synthetic_size=5000, skip_bad_images=False):
    """How to get a dataset: a namespace with make(split, transform) -> a Dataset for split in
    pretrain/train/test, the normalisation mean and std, the crop size (image_size, else the
    dataset's own), and name, data_dir and skip_bad_images (for tensor_pipeline.py)."""
    if dataset == "synthetic":
        try:
            import synthetic
        except ImportError:
            die("--dataset synthetic needs synthetic.py beside common.py; use --dataset folder or cifar10")
        splits = synthetic.splits(synthetic_size)
        mean, std = synthetic.normalization(splits["train"][0])
        image_size = image_size or NATIVE_SIZE["synthetic"]
        make = lambda split, transform: synthetic.ArrayImageDataset(*splits[split], transform)  # noqa: E731
    elif dataset == "folder":
        mean, std = NORMALIZATION["folder"]
        image_size = image_size or folder_image_size(data_dir)
        make = lambda split, transform: image_folder(data_dir, split, transform, skip_bad_images)  # noqa: E731
    else:
        mean, std = NORMALIZATION[dataset]
        image_size = image_size or NATIVE_SIZE[dataset]
        make = lambda split, transform: torchvision_split(dataset, data_dir, split, transform)  # noqa: E731
    return SimpleNamespace(name=dataset, data_dir=data_dir, make=make, mean=mean, std=std, image_size=image_size,
                           skip_bad_images=skip_bad_images)


def loader_kwargs(num_workers, device):
    # Workers are restarted every epoch and seeded from the loader's generator, which
    # set_data_epoch reseeds: a resumed run draws the same augmentations as an uninterrupted one.
    return dict(num_workers=num_workers, pin_memory=device.startswith("cuda"), worker_init_fn=seed_worker)


@dataclasses.dataclass
class Data:
    """What build_data returns. A method's loop reads only train_loader: any iterable with len()
    that yields ((x1, x2), labels), two augmented views (B, 3, H, W), works, a plain
    torch.utils.data.DataLoader included (with a `generator`, set_data_epoch makes resume exact).
    The eval loaders yield clean, normalised (images, labels) batches in order."""
    train_loader: object
    eval_train_loader: object
    eval_test_loader: object
    num_classes: int
    image_size: int            # the crop size it chose: stored with the run, so a resume rebuilds the same
    mean: tuple
    std: tuple
    pipeline: str              # "tensor" or "pil", as chosen by --pipeline auto


def build_data(args, rank=0, world_size=1):
    """The pretraining loader (two augmented views per image) and clean loaders for evaluation:
    the tensor pipeline (tensor_pipeline.py: uint8 images on the training device, augmented in
    batches) when it is beside this file and the dataset fits in memory, else torchvision's PIL
    transforms in DataLoader workers (--pipeline). Reads args, changes nothing; returns Data.
    Under torchrun the pretraining loader yields process `rank`'s share of every global batch of
    --batch-size, with the images and views one process gives that slice."""
    source = dataset_source(args.dataset, args.data_dir, args.image_size, args.synthetic_size, args.skip_bad_images)
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
    view1, view2 = augmentation_recipe(args.augmentations, source.image_size, source.mean, source.std,
                                       args.blur_p)
    clean = eval_transform(source.image_size, source.mean, source.std)
    pretrain_set = source.make("pretrain", TwoViews(view1, view2))
    eval_train_set, eval_test_set = source.make("train", clean), source.make("test", clean)
    if len(pretrain_set) < args.batch_size:
        die(f"--batch-size {args.batch_size} is larger than the {len(pretrain_set)} training images")
    generator = torch.Generator().manual_seed(args.seed)  # the order and every image's seed; set_data_epoch reseeds it
    train_loader = torch.utils.data.DataLoader(
        SeededImages(pretrain_set), batch_sampler=GlobalBatches(len(pretrain_set), args.batch_size, rank, world_size,
                                                                generator),
        generator=generator, **loader_kwargs(args.num_workers, args.device))
    eval_loader = lambda dataset: torch.utils.data.DataLoader(  # noqa: E731  own generator: evaluation
        dataset, batch_size=512, shuffle=False, generator=torch.Generator(),  # leaves the global RNG alone
        **loader_kwargs(args.num_workers, args.device))
    return Data(train_loader, eval_loader(eval_train_set), eval_loader(eval_test_set), len(eval_train_set.classes),
                source.image_size, source.mean, source.std, "pil")


class GlobalBatches(torch.utils.data.Sampler):
    """The PIL pipeline's batches, as lists of (image index, seed of its views): the epoch's order and one
    seed per position drawn from `generator` (the same in every process), then process `rank`'s slice of
    each global batch; the last partial batch is dropped. The views depend neither on the number of
    processes nor on the loader's workers."""

    def __init__(self, num_images, batch_size, rank, world_size, generator):
        self.num_images, self.batch_size, self.generator = num_images, batch_size, generator
        share = batch_size // world_size
        self.part = slice(rank * share, (rank + 1) * share)

    def __len__(self):
        return self.num_images // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.num_images, generator=self.generator).tolist()
        seeds = torch.randint(2**62, (self.num_images,), generator=self.generator).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield [(order[i], seeds[i]) for i in range(start, start + self.batch_size)[self.part]]


class SeededImages(torch.utils.data.Dataset):
    """dataset[(index, seed)] is dataset[index] with its transform's random draws seeded by seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # leaves the process's own random stream alone
            torch.default_generator.manual_seed(seed)  # the CPU generator torchvision's transforms draw from
            return self.dataset[index]


def set_data_epoch(train_loader, seed, epoch):
    """Reseed the loader's generator, if it has one, so epoch e sees the same order and views
    whether or not the run was resumed."""
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(seed * 100_003 + epoch)


# ---- Checkpoints and logging ---------------------------------------------------------------------
def prepare_run_dir(args):
    """runs/<run_name>/ with args.json; a resumed run keeps writing into its own folder."""
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    run_dir = os.path.join(args.out_dir, args.run_name)  # parse_run_args checked that it holds no run
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        write_failed(run_dir, exc)
    atomic_write(os.path.join(run_dir, "args.json"), "w",
                 lambda f: json.dump({**vars(args), "command": " ".join(sys.argv)}, f, indent=2))
    return run_dir


def write_failed(path, exc):
    """One line naming the path and the cause (disk full, no permission, read-only...), exit code 1."""
    while exc is not None and not isinstance(exc, OSError):  # torch.save raises a RuntimeError from the OSError
        exc = exc.__cause__ or exc.__context__
    cause = exc.strerror or str(exc) if exc is not None else "the writer failed"
    die(f"could not write {path}: {cause}; any earlier version of it is intact", code=1)


def atomic_write(path, mode, write):
    """write(f) into path.tmp, flushed to disk, then renamed over path: a crash or a failed write leaves the
    earlier file intact and no temporary file; a failed write ends the run in one line (write_failed)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # also a second Ctrl-C in the middle of the write
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, (OSError, RuntimeError)):
            write_failed(path, exc)
        raise


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def rng_states():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, scaler, epoch, global_step, args):
    """Everything needed to continue: epoch counts completed epochs."""
    atomic_save({"method": args.method, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step,
                 "args": vars(args), "rng": rng_states()}, path)


def load_checkpoint(path):
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
    """Restore a run in place; returns (completed epochs, global step)."""
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        die(f"{path} was written by an earlier version of this code (before the online probe), so it cannot be "
            f"resumed here ({type(exc).__name__}); evaluate it with eval_linear.py, or resume it at its own commit")
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    print(f"resumed {path} at epoch {state['epoch']}, step {state['global_step']}")
    return state["epoch"], state["global_step"]


def format_duration(seconds):
    seconds = int(seconds)
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds % 60:02d}s"


class RunLogger:
    """Progress lines on stdout and one JSON line per record in run_dir/metrics.jsonl.

    train_step is called every optimiser step but only reads the loss terms (a host sync) every
    log_every steps; images/s and the ETA are measured over that window, not the whole run.
    """

    def __init__(self, run_dir, epochs, steps_per_epoch, batch_size, log_every):
        self.path = run_dir and os.path.join(run_dir, "metrics.jsonl")  # None: a torchrun process other than rank 0
        self.epochs, self.steps_per_epoch, self.batch_size = epochs, steps_per_epoch, batch_size
        self.log_every = log_every
        self.total_steps = epochs * steps_per_epoch
        self.window_start, self.window_steps = time.perf_counter(), 0

    def write(self, record):
        if not self.path:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            write_failed(self.path, exc)

    def due(self, global_step):
        """Whether train_step(global_step) will log: every log_every steps and at the last step."""
        return global_step % self.log_every == 0 or global_step == self.total_steps

    def train_step(self, epoch, global_step, terms, lr):
        self.window_steps += 1
        if not self.due(global_step):
            return
        values = {
            name: float(value.detach() if torch.is_tensor(value) else value)  # tensors: a host sync, once a window
            for name, value in terms.items()
        }
        values = mean_over_processes(values)  # torchrun: every process's terms averaged, those of the global batch
        if not all(math.isfinite(v) for v in values.values()):
            die(f"loss is {values} at step {global_step} (epoch {epoch + 1}): training diverged. "
                f"Lower --base-lr or use --precision fp32; the last checkpoint is kept", code=1)
        elapsed = time.perf_counter() - self.window_start
        images_per_s = self.window_steps * self.batch_size / elapsed
        eta = (self.total_steps - global_step) * elapsed / self.window_steps
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.write({"type": "train", "epoch": epoch + 1, "step": global_step, **values, "lr": lr,
                    "images_per_s": images_per_s})
        in_epoch = global_step - epoch * self.steps_per_epoch
        terms_text = " ".join(f"{name} {value:.4f}" for name, value in values.items())
        print(f"epoch {epoch + 1}/{self.epochs} step {in_epoch}/{self.steps_per_epoch} | {terms_text} | "
              f"lr {lr:.3g} | {images_per_s:.0f} img/s | eta {format_duration(eta)}", flush=True)

    def evaluation(self, epoch, global_step, results):
        """One evaluation after `epoch` (0-based; -1 is the untrained backbone, logged as epoch 0)."""
        self.write({"type": "eval", "epoch": epoch + 1, "step": global_step, **results})
        print(f"eval epoch {epoch + 1}: " + " | ".join(f"{k} {v:.2f}" for k, v in results.items()), flush=True)

    def summary(self, results):
        """The run's before and after: the untrained backbone's evaluation (epoch 0) against the last."""
        with open(self.path) as f:
            before = next((r for r in map(json.loads, f) if r["type"] == "eval" and r["epoch"] == 0), None)
        untrained = f"{before['knn_top1']:.1f}% untrained -> " if before else ""
        print(f"kNN top-1 (weighted, k=200, clean test images): {untrained}{results['knn_top1']:.1f}% after "
              f"{self.epochs} epochs; linear probe (fast, cached features) {results['linear_top1']:.1f}%")

    def exclude(self, seconds):
        """Leave time spent outside training steps (evaluation, checkpoints) out of images/s."""
        self.window_start += seconds


@dataclasses.dataclass
class RunState:
    """What the end-of-epoch work needs of a run."""
    run_dir: str
    args: object
    model: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: Data
    device: torch.device
    log: "RunLogger"


def end_of_epoch(run, epoch, global_step):
    """Checkpoint (and after the last epoch backbone.pt), then evaluate every --eval-every epochs
    and at the end, with the linear probe at the end. Returns the evaluation, or None."""
    started, last, results = time.perf_counter(), epoch + 1 == run.args.epochs, None
    if run.run_dir is not None:  # torchrun: rank 0 alone saves and evaluates; the others wait for it below
        save_checkpoint(os.path.join(run.run_dir, "checkpoint.pt"), run.model, run.optimizer, run.scaler, epoch + 1,
                        global_step, run.args)
        if last:
            atomic_save(run.model["backbone"].state_dict(), os.path.join(run.run_dir, "backbone.pt"))
        if (epoch + 1) % run.args.eval_every == 0 or last:
            results = evaluate(run.model, run.data, run.device, linear=last)
            run.log.evaluation(epoch, global_step, results)
        if last:
            run.log.summary(results)
            print(f"done: {run.run_dir}/checkpoint.pt, backbone.pt, metrics.jsonl")
            method, checkpoint = run.args.method, os.path.relpath(os.path.join(run.run_dir, "checkpoint.pt"))
            print(f"next: `python eval_linear.py --checkpoint {checkpoint}` (linear probes, README: Evaluation), "
                  f"`python spectrum.py {checkpoint}` (the spectra), `python {method}.py --dataset cifar10` (the full "
                  f"recipe, a GPU), or `--dataset folder --data-dir DIR` for your own images")
    if not last:
        stop_if_signalled(run, epoch + 1, global_step)  # a signal during the evaluation
    run.log.exclude(time.perf_counter() - started)
    return results


# ---- Stopping cleanly: SIGINT, SIGTERM, and errors inside training -------------------------------
SIGNALLED = []  # the signals received since stop_safely began, at most one before it stops


def epoch_batches(train_loader, seed, epoch, global_step):
    """The batches of `epoch` still to train: the loader reseeded for the epoch (set_data_epoch), less the
    global_step - epoch x len(train_loader) a run resumed mid-epoch has trained already. Those are still
    loaded and augmented, since the random draws of the batches after them follow theirs (the global RNG,
    which the PIL pipeline without workers draws from, is put back as the checkpoint left it): resuming
    costs the data loading of the steps done, not their training, and continues exactly."""
    set_data_epoch(train_loader, seed, epoch)
    done = max(0, global_step - epoch * len(train_loader))
    if done >= len(train_loader):  # stopped after the epoch's last step: only its evaluation is left
        return iter(())
    batches = iter(train_loader)
    if done:
        states = rng_states()
        for _ in itertools.islice(batches, done):
            pass
        set_rng_states(states)
    return batches


def resume_hint(run):
    if run.run_dir is None:  # torchrun: rank 0 says it
        return "see the first process's message"
    path = os.path.join(run.run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return f"no checkpoint was written yet: delete {run.run_dir} and start again"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return (f"continue from the checkpoint (epoch {state['epoch']}, step {state['global_step']}) with "
            f"`python {run.args.method}.py --resume {os.path.relpath(path)}`")


@contextlib.contextmanager
def stop_safely(run):
    """Around the training and the evaluation before it. The first SIGINT (Ctrl-C) or SIGTERM (what a
    scheduler sends before it preempts a job) lets the current step finish; stop_if_signalled then writes a
    checkpoint at that step and exits 130 or 143. A second one stops at once (the last checkpoint is kept).
    Any other error (out of memory, a data file gone) ends in one line with what to do; the full traceback
    goes to run_dir/traceback.txt."""
    def on_signal(signum, frame):
        SIGNALLED.append(signum)
        name = signal.Signals(signum).name
        if len(SIGNALLED) > 1:
            print(f"error: {name} again: stopped at once; {resume_hint(run)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        print(f"\n{name}: finishing this step, then writing a checkpoint (send it again to stop at once)", flush=True)

    SIGNALLED.clear()
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception as exc:
        if run.run_dir is not None:  # torchrun: rank 0 alone has a run folder
            with contextlib.suppress(OSError), open(os.path.join(run.run_dir, "traceback.txt"), "w") as f:
                traceback.print_exc(file=f)
        message = (str(exc).strip().splitlines() or [""])[-1]  # a DataLoader worker's error ends with the cause
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            what = (f"out of memory on {run.args.device}; free the GPU (another process?) and resume, or start over "
                    f"with a smaller --batch-size")
        elif isinstance(exc, OSError):
            what = f"could not read the data ({message}); check --data-dir, then resume"
        else:
            what = f"{type(exc).__name__}: {message} (traceback in {run.run_dir}/traceback.txt)"
        die(f"{what}; {resume_hint(run)}", code=1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_if_signalled(run, epoch, global_step):
    """After a step (and after an epoch's evaluation): if SIGINT or SIGTERM came, write a checkpoint at this
    step, with `epoch` the completed epochs, print the command that resumes it and exit 128 + the signal."""
    # Test hook: SSL_SIGNAL_AFTER_STEP="K SIGTERM" (or "K SIGINT SIGINT") sends the run those signals after
    # optimiser step K, so that tests interrupt mid-epoch at a known step (test_methods.py).
    hook = os.environ.get("SSL_SIGNAL_AFTER_STEP", "").split()
    if hook and int(hook[0]) == global_step:
        for name in hook[1:]:
            os.kill(os.getpid(), getattr(signal, name))
    signum = signalled_anywhere(SIGNALLED[0] if SIGNALLED else 0)  # torchrun: every process stops at this step
    if not signum:
        return
    if run.run_dir is not None:
        save_checkpoint(os.path.join(run.run_dir, "checkpoint.pt"), run.model, run.optimizer, run.scaler, epoch,
                        global_step, run.args)
        print(f"error: stopped by {signal.Signals(signum).name}; {resume_hint(run)}", file=sys.stderr)
    raise SystemExit(128 + signum)
