"""common.py: the backbone and heads, the augmentation recipes, the orthogonality penalties, optimisation and
evaluation against hand computations and NumPy re-derivations; then the plumbing's guarantees (README: What
you can rely on): flags, run folders, checkpoints, failed writes, unreadable images, errors and signals."""
import argparse
import contextlib
import errno
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import urllib.error
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
from conftest import (HERE, TINY_RUN, beside, folder_run, method_module, run_script, run_signalled, separable_features,
                      signal_after, so_numpy, write_image_folder, write_unlabelled_tree)


@pytest.fixture(scope="module")
def simclr():
    """The method whose runs exercise the plumbing (any method would do), on the synthetic set (TINY_RUN)."""
    method_module("synthetic")
    return method_module("simclr")


# ----------------------------------------------------------------------------------------------
# Backbone and heads
# ----------------------------------------------------------------------------------------------


def test_backbones_have_the_cifar_stem_below_64_px_and_report_their_width():
    net, dim = common.build_backbone("resnet18", 32)
    assert dim == 512 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    net, dim = common.build_backbone("resnet18", 224)
    assert net.conv1.kernel_size == (7, 7) and dim == 512
    assert common.build_backbone("resnet50", 32)[1] == 2048
    net, dim = common.build_backbone("convnet", 32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim) == (2, 256)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_the_cifar_stem_gives_34_px_maps_like_solo_learn_and_intl(arch):
    """solo-learn (fca55e3 solo/methods/base.py: padding 2) and INTL (0aa69af: pad 1, then padding 1) run the
    first 3x3 conv on 34 x 34 maps for 32 px inputs."""
    net, _ = common.build_backbone(arch, 32)
    shapes = []
    net.conv1.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    net.eval()(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 64, 34, 34)] and net.conv1.padding == (2, 2)


def readme_block(heading):
    """The first indented Python block (from `import`) under a README heading, dedented."""
    lines = open(os.path.join(HERE, "README.md")).read().split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    import "))
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    "))
    return "\n".join(line[4:] for line in lines[start:end])


def test_the_readme_loads_backbone_pt_and_checkpoint_pt_into_torchvision_with_the_runs_features(tmp_path,
                                                                                                monkeypatch):
    """README, the backbone elsewhere, run as it is on a ResNet-18 run at 16 px (the CIFAR stem): torchvision's
    resnet18 gives build_backbone's features from backbone.pt, and from checkpoint.pt (here changed, so that the two
    files differ) the checkpoint's."""
    simclr = method_module("simclr")
    write_image_folder(str(tmp_path / "data"), classes=2, train_per_class=8, test_per_class=4, size=16)
    monkeypatch.chdir(tmp_path)
    simclr.main(simclr.parse_args(folder_run(tmp_path / "data", "--arch", "resnet18", "--batch-size", "8", "--epochs",
                                             "1", "--warmup-epochs", "0", "--run-name", "NAME")))
    checkpoint = torch.load("runs/NAME/checkpoint.pt", weights_only=True)
    for key, value in checkpoint["model"].items():
        if key.startswith("backbone.") and value.is_floating_point():
            value.add_(0.01)
    torch.save(checkpoint, "runs/NAME/checkpoint.pt")
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    namespace = {"images": images}
    with torch.no_grad():
        exec(readme_block("## Your own images, and the backbone elsewhere"), namespace)
        for weights, features in ((torch.load("runs/NAME/backbone.pt", weights_only=True), namespace["features"]),
                                  ({k[9:]: v for k, v in checkpoint["model"].items() if k.startswith("backbone.")},
                                   namespace["backbone"](images))):
            run_backbone, dim = common.build_backbone("resnet18", 16)
            run_backbone.load_state_dict(weights)
            assert features.shape == (4, dim) == (4, 512) and torch.equal(features, run_backbone.eval()(images))
        assert not torch.allclose(namespace["features"], namespace["backbone"](images))


def test_projection_mlp_layout():
    plain = common.projection_mlp([512, 2048, 256], batch_norm=False)
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"]
    assert (plain[0].in_features, plain[0].out_features, plain[2].out_features) == (512, 2048, 256)
    deep = common.projection_mlp([512, 2048, 2048, 2048], hidden_bias=False)
    assert [type(m).__name__ for m in deep] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert deep[0].bias is None and deep[-1].bias is not None


# ----------------------------------------------------------------------------------------------
# Augmentation recipes
# ----------------------------------------------------------------------------------------------


def test_every_image_in_a_batch_gets_its_own_views():
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    view1, view2 = common.augmentation_recipe("symmetric", 32, (0.5,) * 3, (0.25,) * 3)
    two_views = common.Views(view1, view2)
    pairs = [two_views(Image.fromarray(image)) for _ in range(8)]
    x1, x2 = torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])
    assert x1.shape == x2.shape == (8, 3, 32, 32)
    # eight copies of one image: all sixteen views differ from each other
    views = torch.cat([x1, x2]).flatten(1)
    distances = torch.cdist(views, views) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3


def test_recipes_match_the_published_configs():
    """solo-learn fca55e3 (bash_files/pretrain/cifar/*.sh, solo/args/{dataset,utils}.py) and INTL 0aa69af
    (cifar/transform.py): SimCLR and VICReg blur with p = 0.5 at every size, the asymmetric pair only
    above 64 px (1.0 / 0.1); the blur is sigma in [0.1, 2] over at least 13 taps."""
    def settings(name, size):  # RandomApply steps keyed by what they apply
        inner = lambda t: t.transforms[0] if isinstance(t, common.T.RandomApply) else t  # noqa: E731
        return [{type(inner(t)).__name__: t for t in view.transforms}
                for view in common.augmentation_recipe(name, size, (0.5,) * 3, (0.25,) * 3)]

    symmetric = settings("symmetric", 32)
    jitter = symmetric[0]["ColorJitter"].transforms[0]
    assert [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue] == [
        pytest.approx((0.2, 1.8)), pytest.approx((0.2, 1.8)), pytest.approx((0.2, 1.8)), pytest.approx((-0.2, 0.2))]
    assert symmetric[0]["ColorJitter"].p == 0.8 and symmetric[0]["RandomGrayscale"].p == 0.2
    assert symmetric[0]["RandomHorizontalFlip"].p == 0.5
    assert symmetric[0]["RandomResizedCrop"].interpolation == common.T.InterpolationMode.BICUBIC
    assert symmetric[0]["RandomResizedCrop"].scale == (0.08, 1.0)
    assert "RandomSolarize" not in symmetric[0]
    asymmetric = settings("asymmetric", 32)
    assert "RandomSolarize" not in asymmetric[0] and asymmetric[1]["RandomSolarize"].p == 0.2
    for view in asymmetric + settings("vicreg", 32):
        jitter = view["ColorJitter"].transforms[0]
        assert [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue] == [
            pytest.approx((0.6, 1.4)), pytest.approx((0.6, 1.4)), pytest.approx((0.8, 1.2)), pytest.approx((-0.1, 0.1))]
        assert (view["ColorJitter"].p, view["RandomGrayscale"].p, view["RandomHorizontalFlip"].p) == (0.8, 0.2, 0.5)
    vicreg = settings("vicreg", 32)
    assert vicreg[0]["RandomResizedCrop"].scale == (0.2, 1.0)
    assert vicreg[0]["RandomSolarize"].p == vicreg[1]["RandomSolarize"].p == 0.1

    def blur(name, size):
        return [(view["GaussianBlur"].p, view["GaussianBlur"].transforms[0].kernel_size[0],
                 view["GaussianBlur"].transforms[0].sigma) if "GaussianBlur" in view else None
                for view in settings(name, size)]
    assert blur("symmetric", 32) == blur("vicreg", 32) == [(0.5, 13, (0.1, 2.0))] * 2
    assert blur("asymmetric", 32) == [None, None]
    assert blur("asymmetric", 96) == [(1.0, 13, (0.1, 2.0)), (0.1, 13, (0.1, 2.0))]
    assert blur("symmetric", 224) == [(0.5, 23, (0.1, 2.0))] * 2



def test_blur_p_replaces_the_recipes_blur_in_both_views():
    assert common.recipe_settings("symmetric", 32, 0.0) == [{**common.AUGMENTATION_RECIPES["symmetric"][0],
                                                              "blur_p": 0.0, "crop_size": 32}] * 2
    assert [v["blur_p"] for v in common.recipe_settings("asymmetric", 96, 0.3)] == [0.3, 0.3]
    assert [v["blur_p"] for v in common.recipe_settings("asymmetric", 96)] == [1.0, 0.1]
    assert [v["blur_p"] for v in common.recipe_settings("vicreg", 32)] == [0.5, 0.5]


def test_the_multi_crop_views_are_intls_imagenet_crops_scaled_to_the_image_size():
    """winci-ai/INTL 0aa69af src/transform.py (Multi_Crop): crops [2, 1, 1, 1, 1] of [224, 192, 160, 128, 96] px,
    scales from [0.2, 0.171, 0.143, 0.114, 0.086] to [1, 0.857, 0.714, 0.571, 0.429]; every crop: blur 0.5,
    solarisation 0.1, jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, bicubic, flip 0.5."""
    views = common.augmentation_recipe("multicrop", 224, (0.5,) * 3, (0.25,) * 3)
    steps = [{type(t.transforms[0] if isinstance(t, common.T.RandomApply) else t).__name__: t for t in v.transforms}
             for v in views]
    crops = [view["RandomResizedCrop"] for view in steps]
    assert [c.size for c in crops] == [(224, 224), (224, 224), (192, 192), (160, 160), (128, 128), (96, 96)]
    assert [c.scale for c in crops] == [(0.2, 1.0), (0.2, 1.0), (0.171, 0.857), (0.143, 0.714), (0.114, 0.571),
                                        (0.086, 0.429)]
    assert all(c.interpolation == common.T.InterpolationMode.BICUBIC for c in crops)
    for view in steps:
        jitter = view["ColorJitter"].transforms[0]
        assert [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue] == [
            pytest.approx((0.6, 1.4)), pytest.approx((0.6, 1.4)), pytest.approx((0.8, 1.2)), pytest.approx((-0.1, 0.1))]
        assert (view["ColorJitter"].p, view["RandomGrayscale"].p, view["RandomHorizontalFlip"].p) == (0.8, 0.2, 0.5)
        assert (view["GaussianBlur"].p, view["RandomSolarize"].p) == (0.5, 0.1)
    assert [v["crop_size"] for v in common.recipe_settings("multicrop", 64)] == [64, 64, 55, 46, 37, 27]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8))
    assert [tuple(x.shape) for x in common.Views(*common.augmentation_recipe("multicrop", 64, (0.5,) * 3,
                                                                             (0.25,) * 3))(image)] == \
        [(3, 64, 64), (3, 64, 64), (3, 55, 55), (3, 46, 46), (3, 37, 37), (3, 27, 27)]


def test_evaluation_subsets_are_evenly_spaced_first_to_last_in_exact_integers():
    """floor(i (N - 1) / (k - 1)) for i < k, in integer arithmetic: every index when N <= k, else the first and
    the last and k - 2 between (ImageNet's 1,281,167 training images at EVAL_TRAIN_IMAGES, CIFAR at RANKME_IMAGES)."""
    assert common.evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert common.evenly_spaced(11, 3).tolist() == [0, 5, 10]
    for count, limit in ((1_281_167, common.EVAL_TRAIN_IMAGES), (50_000, common.RANKME_IMAGES)):
        assert common.evenly_spaced(count, limit).tolist() == [i * (count - 1) // (limit - 1) for i in range(limit)]


def test_the_eval_transform_resizes_to_256_and_crops_224_at_imagenet_size_and_keeps_small_images_whole():
    assert [common.eval_size(size) for size in (32, 64, 96, 224, 112)] == [32, 64, 96, 256, 128]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    x = common.eval_transform(224, (0.5,) * 3, (0.25,) * 3)(image)
    resized = image.resize((341, 256), Image.BICUBIC)  # the shorter side to 256: 400 x 256 / 300 = 341.3
    expected = (torch.from_numpy(np.array(resized)[16:240, 58:282]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.testing.assert_close(common.eval_transform(32, (0.0,) * 3, (1.0,) * 3)(small),
                               torch.from_numpy(np.array(small)).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("arch,last_norm", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_the_last_norm_of_every_residual_block(arch, last_norm):
    for zero in (False, True):
        net, _ = common.build_backbone(arch, 224, zero_init_residual=zero)
        norms = [getattr(block, last_norm).weight for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
                 for block in layer]
        assert len(norms) == (8 if arch == "resnet18" else 16)
        assert all((w == 0).all() for w in norms) == zero and all((w != 0).all() for w in norms) != zero
        assert (net.bn1.weight == 1).all()  # the stem's norm is not residual


def test_sgd_with_norms_excluded_decays_the_weights_only_as_intls_imagenet_code():
    """INTL 0aa69af main.py: params with ndim == 1 (biases, every norm weight and bias) in a group without
    weight decay, the rest with cfg.wd; plain sgd (its CIFAR code) decays all; the probe never."""
    model = nn.ModuleDict({"backbone": nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
                           "online_probe": nn.Linear(2, 3)})
    optimizer = common.build_optimizer("sgd-norms-excluded", model, lr=0.3, weight_decay=1e-5, probe_lr=0.1)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    backbone = model["backbone"]
    assert [decays[id(p)] for p in (backbone[0].weight, backbone[2].weight)] == [1e-5, 1e-5]
    norms = (backbone[0].bias, backbone[1].weight, backbone[1].bias, backbone[2].bias)
    assert [decays[id(p)] for p in norms] == [0] * 4
    assert all(decays[id(p)] == 0 for p in model["online_probe"].parameters()) and len(decays) == 8
    assert optimizer.defaults["momentum"] == 0.9 and isinstance(optimizer, torch.optim.SGD)
    plain = common.build_optimizer("sgd", model, lr=0.3, weight_decay=1e-4, probe_lr=0.1)
    assert sum(len(g["params"]) for g in plain.param_groups if g["weight_decay"] == 1e-4) == 6

# ----------------------------------------------------------------------------------------------
# Orthogonality regularization (SO, SRIP)
# ----------------------------------------------------------------------------------------------


def orthogonal_layers():
    """Square, wide, tall and conv-shaped layers with (semi-)orthogonal weights."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16), nn.Linear(32, 8), nn.Linear(8, 32), nn.Conv2d(4, 16, 3), nn.Conv2d(16, 64, 1)]
    for layer in layers:
        nn.init.orthogonal_(layer.weight)  # flattens a conv weight to out x (in kh kw)
    return layers


def test_so_and_srip_are_zero_for_orthogonal_and_semi_orthogonal_weights():
    layers = orthogonal_layers()
    for layer in layers:
        assert common.so_penalty([layer]).item() == pytest.approx(0, abs=1e-9)
        assert common.srip_penalty([layer], iters=5).item() == pytest.approx(0, abs=1e-5)
    assert common.orthogonality_error(layers) == pytest.approx(0, abs=1e-5)


def test_so_penalty_matches_numpy_on_random_layers_of_repeated_shapes():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 40, 1),
                           nn.Flatten(), nn.Linear(40, 10), nn.Linear(10, 40), nn.Linear(10, 40))
    weights = [m.weight for m in module if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert common.so_penalty(module).item() == pytest.approx(so_numpy(weights), rel=1e-5)
    for w in weights:
        w.data.mul_(3.0)  # far from orthogonal
    assert common.so_penalty(module).item() == pytest.approx(so_numpy(weights), rel=1e-5)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 3, 3, 3), (40, 2, 2, 2)])
def test_so_gradient_is_the_analytic_one(shape):
    """d/dW ||W^T W - I||^2 = 4 W (W^T W - I) for tall W; 4 (W W^T - I) W for wide W."""
    torch.manual_seed(2)
    layer = nn.Conv2d(shape[1], shape[0], shape[2]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
    common.so_penalty([layer]).backward()
    w = layer.weight.detach().reshape(shape[0], -1)
    eye = lambda k: torch.eye(k)  # noqa: E731
    expected = 4 * (w @ w.T - eye(len(w))) @ w if w.shape[0] <= w.shape[1] else 4 * w @ (w.T @ w - eye(w.shape[1]))
    torch.testing.assert_close(layer.weight.grad.reshape(shape[0], -1), expected, rtol=1e-4, atol=1e-5)


def exact_spectral_norms(layers):
    norms = []
    for layer in layers:
        w = common.weight_matrix(layer).detach().double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        norms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), dtype=gram.dtype), ord=2).item())
    return norms


def test_srip_agrees_with_the_exact_spectral_norm_within_1_percent_on_resnet18_layers():
    """Fresh random start, the default 100 iterations: every layer within 1%."""
    torch.manual_seed(3)
    backbone, _ = common.build_backbone("resnet18", 32)
    layers = [layer for _, layer in common.regularised_layers(backbone)]
    for layer, exact in zip(layers, exact_spectral_norms(layers)):
        assert common.srip_penalty([layer]).item() == pytest.approx(exact, rel=0.01)


def test_srip_persistent_vectors_track_the_spectral_norm_as_weights_move():
    """The regulariser converges once at construction, then takes 2 iterations per call: after
    each of 20 small random weight updates the sum stays within 1% of the exact sum."""
    torch.manual_seed(4)
    model = nn.ModuleDict({"backbone": common.small_convnet(), "projector": common.projection_mlp([256, 64, 32])})
    regulariser = common.OrthogonalityRegularizer(model, "srip", heads=True)
    for _ in range(20):
        with torch.no_grad():
            for layer in regulariser.layers:
                layer.weight.add_(0.01 * layer.weight.std() * torch.randn_like(layer.weight))
        assert regulariser().item() == pytest.approx(sum(exact_spectral_norms(regulariser.layers)), rel=0.01)
    assert len(regulariser.srip_vectors()) == len(regulariser.state_dict()) == 6  # one per weight shape
    (regulariser() + regulariser()).backward()  # the in-place vector update never touches a saved tensor
    assert all(layer.weight.grad is not None for layer in regulariser.layers)


def test_regularised_layers_of_resnet18_are_its_20_convs_and_heads_extend_them():
    backbone, _ = common.build_backbone("resnet18", 32)
    projector, predictor = common.projection_mlp([512, 64, 32]), common.projection_mlp([32, 64, 32])
    model = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor,
                           "target": nn.ModuleDict({"backbone": common.small_convnet()})})
    expected = ["backbone.conv1"]
    expected += [f"backbone.layer{s}.{b}.conv{c}" for s in range(1, 5) for b in (0, 1) for c in (1, 2)]
    expected += [f"backbone.layer{s}.0.downsample.0" for s in (2, 3, 4)]
    plain = common.OrthogonalityRegularizer(model, "so")
    assert len(plain.layers) == 20 and sorted(plain.layer_names) == sorted(expected)
    assert all(isinstance(layer, nn.Conv2d) for layer in plain.layers)
    heads = common.OrthogonalityRegularizer(model, "so", heads=True)
    assert heads.layer_names[20:] == ["projector.0", "projector.3", "predictor.0", "predictor.3"]  # never the target
    assert heads().item() == pytest.approx(so_numpy([layer.weight for layer in heads.layers]), rel=1e-5)
    assert common.OrthogonalityRegularizer(model, "none")().item() == 0 and len(plain.state_dict()) == 0


def test_ortho_weight_defaults_by_kind_and_refuses_a_weight_without_a_penalty_or_below_zero(simclr, capsys):
    quick = ["--dataset", "synthetic", "--device", "cpu"]
    assert simclr.parse_args(quick + ["--ortho", "so"]).ortho_weight == 1e-6
    assert simclr.parse_args(quick + ["--ortho", "srip"]).ortho_weight == 1e-3
    assert simclr.parse_args(quick).ortho_weight == 0.0
    capsys.readouterr()
    for flags, message in ((["--ortho-weight", "1e-3"], "has no effect without --ortho so"),
                           (["--ortho", "so", "--ortho-weight", "-1"], "expected a number >= 0, got -1")):
        with pytest.raises(SystemExit):
            simclr.parse_args(quick + flags)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))   # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = common.LARS([{"params": [w]}, {"params": [b], "lars": False, "weight_decay": 0.0}],
                            lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)           # ||g|| = 1
    b.grad = torch.tensor([2.0], dtype=torch.float64)
    optimizer.step()
    # trust = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; clipped: min(trust / 0.5, 1) = 2/15
    # update = 2/15 * (g + 0.1 w) = 2/15 * (0.9, 1.2) = (0.12, 0.16); w -= 0.5 * update
    assert w.tolist() == pytest.approx([2.94, 3.92], abs=1e-8)     # eps = 1e-8 in the denominator
    assert b.tolist() == pytest.approx([0.0], abs=1e-12)              # plain SGD, no decay: 1 - 0.5 * 2
    # second step: momentum buffer = 0.9 * old update + new update
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    w_norm = math.hypot(2.94, 3.92)
    trust = min(0.02 * w_norm / (1 + 0.1 * w_norm) / 0.5, 1.0)
    update = [trust * (0.6 + 0.1 * 2.94), trust * (0.8 + 0.1 * 3.92)]
    buffer = [0.9 * 0.12 + update[0], 0.9 * 0.16 + update[1]]
    b.grad = None
    optimizer.step()
    assert w.tolist() == pytest.approx([2.94 - 0.5 * buffer[0], 3.92 - 0.5 * buffer[1]], abs=1e-8)


def test_lars_clipping_falls_back_to_sgd_for_large_trust_ratios():
    # a tiny gradient makes the trust ratio huge; clipping caps the step at plain SGD's
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = common.LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0)
    w.grad = torch.tensor([1e-4, 0.0], dtype=torch.float64)
    optimizer.step()
    assert w.tolist() == pytest.approx([3.0 - 0.1 * 1e-4, 4.0], abs=1e-15)


def test_build_optimizer_excludes_biases_and_norms_from_lars_and_decay():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    lars = common.build_optimizer("lars", model, lr=0.1, weight_decay=1e-5)
    scaled, excluded = lars.param_groups
    assert scaled["lars"] and scaled["weight_decay"] == 1e-5 and all(p.ndim == 2 for p in scaled["params"])
    assert not excluded["lars"] and excluded["weight_decay"] == 0.0 and len(excluded["params"]) == 4
    sgd = common.build_optimizer("sgd", model, lr=0.1, weight_decay=1e-4)
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["weight_decay"] == 1e-4


def test_warmup_cosine_hand_values():
    lr = lambda step, final=0.0: common.warmup_cosine(step, 110, 10, 2.0, final)  # noqa: E731
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])
    assert lr(10) == pytest.approx(2.0)                  # cosine starts at the peak
    assert lr(60) == pytest.approx(1.0)                  # half way: (peak + final) / 2
    assert lr(60, final=0.2) == pytest.approx(1.1)
    assert lr(35) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert lr(110) == pytest.approx(0.0, abs=1e-12) and lr(110, final=0.2) == pytest.approx(0.2)



def test_the_shared_recipe_constants_are_pinned_to_their_sources():
    """LARS (solo-learn fca55e3 solo/utils/lars.py: eta 0.02, clipping, eps 1e-8, momentum 0.9), INTL's SGD
    momentum 0.9 (winci-ai/INTL 0aa69af cifar/main.py), the evaluation protocols (weighted kNN k=200, T=0.1:
    lightly's benchmark; 5-NN cosine, and Euclidean as INTL's) and the fast linear probe."""
    model = nn.ModuleDict({"backbone": nn.Linear(4, 4), "online_probe": nn.Linear(4, 2)})
    lars = common.build_optimizer("lars", model, 0.4, 1e-5, probe_lr=0.1)
    assert {k: lars.defaults[k] for k in ("trust_coefficient", "clip", "eps", "momentum")} == \
        dict(trust_coefficient=0.02, clip=True, eps=1e-8, momentum=0.9)
    assert common.build_optimizer("sgd", model, 0.3, 1e-4).defaults["momentum"] == 0.9
    calls = []
    record = lambda *a, **kw: calls.append(kw) or torch.zeros(4, dtype=torch.long)  # noqa: E731
    batch = [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))]
    with mock.patch.object(common, "knn_predict", record):
        data = SimpleNamespace(eval_train_loader=batch, eval_test_loader=batch, num_classes=2, pretrain_labels=True)
        common.evaluate(nn.ModuleDict({"backbone": nn.Linear(4, 4), "projector": nn.Linear(4, 3),
                                       "online_probe": nn.Linear(4, 2)}), data, torch.device("cpu"))
    assert calls == [dict(k=200, temperature=0.1), dict(k=5, weighted=False),
                     dict(k=5, weighted=False, metric="euclidean")]
    defaults = {k: v.default for k, v in inspect.signature(common.linear_probe).parameters.items()
                if v.default is not inspect.Parameter.empty}
    assert defaults == dict(epochs=100, batch_size=256, lr=1e-3, weight_decay=1e-6, seed=0)

# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def knn_numpy(train, train_labels, test, num_classes, k, temperature, weighted=True):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = []
    for query in test:
        similarity = train @ query
        nearest = np.argsort(-similarity)[:k]
        scores = np.zeros(num_classes)
        for index in nearest:
            scores[train_labels[index]] += math.exp(similarity[index] / temperature) if weighted else 1.0
        predictions.append(int(np.argmax(scores)))
    return np.array(predictions)


@pytest.mark.parametrize("k,temperature,weighted", [(20, 0.1, True), (200, 0.1, True), (7, 0.5, True), (5, 1.0, False)])
def test_knn_matches_numpy(k, temperature, weighted):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(400, 16)), rng.normal(size=(60, 16))
    labels = rng.integers(0, 5, size=400)
    expected = knn_numpy(train, labels, test, 5, k=k, temperature=temperature, weighted=weighted)
    got = common.knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), 5,
                             k=k, temperature=temperature, weighted=weighted, chunk_size=16)
    assert got.tolist() == expected.tolist()


def euclidean_5nn_numpy(train, train_labels, test, num_classes):
    """INTL's 5-NN (0aa69af cifar/eval/evaluate.py), one query at a time: the 5 smallest Euclidean
    distances, then the most frequent label, ties to the smallest label (np.unique sorts, argmax takes
    the first)."""
    predictions = []
    for query in test:
        nearest = np.argsort(np.linalg.norm(train - query, axis=1), kind="stable")[:5]
        values, counts = np.unique(train_labels[nearest], return_counts=True)
        predictions.append(int(values[np.argmax(counts)]))
    return np.array(predictions)


def test_euclidean_5nn_matches_numpy_including_ties():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 12)) * rng.uniform(0.2, 3, size=12), rng.normal(size=(80, 12))
    labels = rng.integers(0, 6, size=300)
    expected = euclidean_5nn_numpy(train, labels, test, 6)
    got = common.knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), 6, k=5,
                             weighted=False, metric="euclidean", chunk_size=16)
    assert got.tolist() == expected.tolist()
    # a constructed tie: 2 + 2 + 1 votes, the two tied classes 4 and 1 -> the smaller label wins
    train = torch.tensor([[1.0, 0], [1.1, 0], [0, 1.0], [0, 1.1], [-1.0, 0], [9.0, 9.0]])
    tie_labels = torch.tensor([4, 4, 1, 1, 3, 0])
    tied = common.knn_predict(train, tie_labels, torch.zeros(1, 2), 5, k=5, weighted=False, metric="euclidean")
    assert tied.item() == 1
    assert euclidean_5nn_numpy(train.numpy(), tie_labels.numpy(), np.zeros((1, 2)), 5).item() == 1


def test_online_probe_sees_no_gradient_path_to_the_backbone_and_skips_unlabelled_images():
    torch.manual_seed(0)
    backbone, projector = nn.Linear(6, 4), nn.Linear(4, 3)
    probe = nn.Linear(4, 5)
    x1, x2, labels = torch.randn(8, 6), torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 4, -1, -1, 0])
    h1, h2 = backbone(x1), backbone(x2)
    ssl = projector(h1).pow(2).mean() + projector(h2).pow(2).mean()
    ssl.backward(retain_graph=True)
    without = [p.grad.clone() for p in (*backbone.parameters(), *projector.parameters())]
    loss = common.online_probe_loss(probe, (h1, h2), labels)
    loss.backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(without, (*backbone.parameters(), *projector.parameters())))
    assert probe.weight.grad.abs().sum() > 0
    # the cross-entropy of each view over the labelled images only, averaged over the views
    logits = [probe(h.detach()) for h in (h1, h2)]
    keep = labels >= 0
    expected = sum(nn.functional.cross_entropy(z[keep], labels[keep]) for z in logits) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert common.online_probe_loss(probe, (h1, h2), torch.full((8,), -1)).item() == 0.0


def test_online_probe_trains_in_the_same_optimiser_without_decay_and_learns_separable_features():
    train, labels = separable_features(seed=0)
    model = nn.ModuleDict({"backbone": nn.Linear(8, 8), "online_probe": nn.Linear(8, 4)})
    for name in ("lars", "sgd"):
        optimizer = common.build_optimizer(name, model, lr=0.4, weight_decay=1e-4, probe_lr=0.1)
        probe_groups = [g for g in optimizer.param_groups if "lr_ratio" in g]
        assert sum(len(g["params"]) for g in probe_groups) == 2 and all(g["weight_decay"] == 0 for g in probe_groups)
        common.set_lr(optimizer, 0.2)                              # half the peak: the probe at half its own peak
        assert [g["lr"] for g in probe_groups] == pytest.approx([0.05, 0.05])
        assert all(g["lr"] == 0.2 for g in optimizer.param_groups if "lr_ratio" not in g)
    regularizer = common.OrthogonalityRegularizer(model, "so", heads=True)
    assert not any(name.startswith("online_probe") for name in regularizer.layer_names)
    probe = nn.Linear(8, 4)
    optimizer = common.build_optimizer("lars", nn.ModuleDict({"online_probe": probe}), 0.1, 1e-5, probe_lr=0.1)
    for _ in range(200):
        loss = common.online_probe_loss(probe, (train,), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test, test_labels = separable_features(seed=1)
    assert common.accuracy(probe(test).argmax(dim=1), test_labels) == 100.0


def test_knn_and_linear_probe_are_perfect_on_separable_features():
    train, train_labels = separable_features(seed=0)
    test, test_labels = separable_features(seed=1)
    for k, weighted in ((200, True), (5, False)):
        predictions = common.knn_predict(train, train_labels, test, 4, k=k, weighted=weighted)
        assert common.accuracy(predictions, test_labels) == 100.0
    top1, top5 = common.linear_probe(train, train_labels, test, test_labels, 4, epochs=100, batch_size=16)
    assert (top1, top5) == (100.0, 100.0)
    # labels shuffled away from the features: the probe can no longer be right everywhere
    shuffled = train_labels[torch.randperm(160, generator=torch.Generator().manual_seed(0))]
    top1, _ = common.linear_probe(train, shuffled, test, test_labels, 4, epochs=100, batch_size=16)
    assert top1 < 60


@pytest.mark.parametrize("k", [1, 3, 10])
def test_effective_rank_of_k_equal_eigenvalues_is_k(k):
    assert common.effective_rank(torch.tensor([2.5] * k + [0.0] * 5)) == pytest.approx(k)


def test_effective_rank_of_an_uneven_spectrum_and_rankme_on_singular_values():
    # p = (2/3, 1/3): H = ln 3 - (2/3) ln 2
    assert common.effective_rank(torch.tensor([1.0, 0.5])) == pytest.approx(math.exp(math.log(3) - 2 / 3 * math.log(2)))
    # RankMe uses the singular values of the embedding matrix (not the covariance eigenvalues)
    u, _ = torch.linalg.qr(torch.randn(100, 3, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    z = u @ torch.diag(sigma) @ v.T                                    # (100, 8), singular values 3, 2, 1
    p = sigma / sigma.sum()
    assert common.embedding_stats(z)["erank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_embedding_stats_tell_collapse_from_spread():
    spread = common.embedding_stats(torch.randn(4000, 16))
    assert spread["erank"] == pytest.approx(16, rel=0.02) and spread["std"] == pytest.approx(1.0, rel=0.05)
    line = torch.randn(4000, 1) * torch.randn(1, 16) + 1e-4 * torch.randn(4000, 16)  # rank one
    assert common.embedding_stats(line)["erank"] < 1.05
    point = torch.randn(1, 16) + 1e-4 * torch.randn(4000, 16)                          # collapsed to a point
    assert common.embedding_stats(point)["std"] < 0.01


# ----------------------------------------------------------------------------------------------
# Plumbing: flags, data, checkpoints, logging
# ----------------------------------------------------------------------------------------------


# Two recipes like a method file's (no method file needed): the first gives the flags' defaults
RECIPES = {"small": dict(epochs=100, batch_size=256, optimizer="lars", base_lr=0.4, weight_decay=1e-5, warmup_epochs=10,
                         final_lr_ratio=0.0, augmentations="symmetric", probe_lr=0.1),
           "big": dict(dataset="folder", arch="resnet50", epochs=800, base_lr=0.3, zero_init_residual=True)}


def parse(argv, offline_check=None):
    """common.parse_run_args on a parser of common's flags alone, with RECIPES."""
    parser = argparse.ArgumentParser()
    common.add_recipe_args(parser, RECIPES)
    common.add_common_args(parser)
    return common.parse_run_args(parser, argv + ["--device", "cpu"], "test", RECIPES,
                                 offline_check or dict(arch="convnet", epochs=40))


def test_a_recipe_gives_its_values_to_the_flags_not_given_and_the_first_recipe_is_the_default():
    assert (parse([]).recipe, parse([]).epochs, parse([]).arch, parse([]).zero_init_residual) == \
        ("small", 100, "resnet18", False)
    args = parse(["--recipe", "big"])
    assert (args.dataset, args.arch, args.epochs, args.base_lr, args.zero_init_residual, args.weight_decay) == \
        ("folder", "resnet50", 800, 0.3, True, 1e-5)                    # the rest: the first recipe's
    assert (args.warmup_epochs, args.eval_every) == (10, 80)            # derived from the recipe's epochs
    args = parse(["--recipe", "big", "--epochs", "5", "--dataset", "synthetic"])  # given flags win over the recipe,
    assert (args.epochs, args.arch, args.dataset) == (5, "convnet", "synthetic")  # the offline check over both
    parser = argparse.ArgumentParser()
    common.add_recipe_args(parser, RECIPES)
    assert "big: dataset=folder, arch=resnet50, epochs=800" in " ".join(parser.format_help().split())  # --help


@pytest.mark.parametrize("argv,expected", [
    ([], (10, 10)),                                          # the reference warm-up; a tenth of the epochs
    (["--epochs", "30"], (3, 3)),                            # both derived from --epochs: a tenth
    (["--epochs", "5"], (0, 1)),
    (["--epochs", "3", "--warmup-epochs", "2"], (2, 1)),     # given: it wins over the cap (once trained with none)
    (["--epochs", "30", "--warmup-epochs=10", "--eval-every", "7"], (10, 7)),
    (["--epochs", "30", "--warmup-epochs", "10"], (10, 3)),  # given equal to the default: still given
])
def test_a_flag_given_wins_over_its_derived_default_and_the_derived_ones_follow_the_epochs(argv, expected):
    args = parse(argv)
    assert (args.warmup_epochs, args.eval_every) == expected


def test_the_offline_check_and_the_ortho_weight_are_defaults_that_a_given_flag_beats(capsys):
    args = parse(["--dataset", "synthetic"])
    assert (args.arch, args.epochs, args.warmup_epochs, args.eval_every) == ("convnet", 40, 4, 4)
    args = parse(["--dataset", "synthetic", "--arch", "resnet18", "--epochs", "7"])  # the given ones win
    assert (args.arch, args.epochs, args.warmup_epochs, args.eval_every) == ("resnet18", 7, 0, 1)
    assert (parse([]).arch, parse([]).epochs) == ("resnet18", 100)                 # only on --dataset synthetic
    assert [parse(["--ortho", kind]).ortho_weight for kind in ("none", "so", "srip")] == [0.0, 1e-6, 1e-3]
    assert parse(["--ortho", "so", "--ortho-weight", "0.5"]).ortho_weight == 0.5
    assert parse(["--ortho", "srip", "--ortho-weight", "0"]).ortho_weight == 0.0
    for argv, message in ((["--epochs", "3", "--warmup-epochs", "4"], "--warmup-epochs 4 is longer than --epochs 3"),
                          (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations
                          (["--ortho-weight", "1e-3"], "has no effect without --ortho so")):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_compile_takes_a_mode_and_compiles_only_the_backbones_in_it(monkeypatch, capsys):
    """--compile alone is torch.compile's default mode; reduce-overhead (CUDA graphs) and max-autotune are passed
    on; anything else is one line, exit 2."""
    assert parse([]).compile is None and parse(["--compile"]).compile == "default"
    assert parse(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit) as exit_info:
        parse(["--compile", "fastest"])
    assert exit_info.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda module, **kwargs: compiled.append((type(module), kwargs)))
    model = nn.ModuleDict({"backbone": common.small_convnet(), "projector": nn.Linear(256, 8)})
    for mode, expected in ((None, []), ("max-autotune", [(nn.Sequential, {"mode": "max-autotune"})])):
        compiled.clear()
        common.prepare_model(model, torch.device("cpu"), mode)
        assert compiled == expected


def test_deterministic_takes_deterministic_kernels_and_without_it_the_fast_ones(monkeypatch):
    """--deterministic (bit-exact GPU resumes): deterministic algorithms (an op without one warns), cuDNN's
    benchmark off, cuBLAS's workspace setting; without it, as by default, cuDNN picks its fastest kernels."""
    assert parse([]).deterministic is False and parse(["--deterministic"]).deterministic is True
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored as it was after the test
    try:
        common.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark is False and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        common.seed_everything(0)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(simclr, tmp_path, monkeypatch):
    """--compile (about a minute of compilation on a CPU): same state dict names, so checkpoints load
    either way, and the same first losses within float tolerance."""
    monkeypatch.chdir(tmp_path)
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        simclr.main(simclr.parse_args(TINY_RUN + ["--epochs", "1", "--run-name", name] + extra))
    eager, compiled = (torch.load(f"runs/{name}/checkpoint.pt", weights_only=True) for name in ("eager", "compiled"))
    assert list(eager["model"]) == list(compiled["model"])
    losses = [[json.loads(line)["loss"] for line in open(f"runs/{name}/metrics.jsonl") if '"train"' in line]
              for name in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_missing_folder_ends_with_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.dataset_source("folder", str(tmp_path / "nowhere"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "--data-dir" in message and "train" in message


def test_failed_download_says_what_to_do(tmp_path, capsys):
    offline = mock.patch("torchvision.datasets.CIFAR10", side_effect=urllib.error.URLError("no network"))
    with offline, pytest.raises(SystemExit) as exit_info:
        common.dataset_source("cifar10", str(tmp_path)).make("train", None)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "--dataset synthetic" in message and "URLError" in message


def test_folder_dataset_reads_imagefolder_layout(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            for i in range(3):
                Image.new("RGB", (40, 48), (i * 40, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    source = common.dataset_source("folder", str(tmp_path))
    assert source.image_size == 40  # shorter side of the first image
    test = source.make("test", common.eval_transform(40, source.mean, source.std))  # falls back to val/
    assert len(test) == 6 and test.classes == ["cat", "dog"] and test[0][0].shape == (3, 40, 40)


def test_a_folder_without_train_is_its_images_at_any_depth_unlabelled_and_bad_folders_end_in_one_line(tmp_path,
                                                                                                      capsys):
    """README, Your own images: every image under DIR (not notes.txt), label -1, no classes, for every split; an empty
    DIR, or --eval-data-dir beside a labelled --data-dir or without train/, ends in one line, exit 2."""
    paths = write_unlabelled_tree(str(tmp_path / "photos"))
    for split in ("pretrain", "train", "test"):
        dataset = common.image_folder(str(tmp_path / "photos"), split, None)
        assert [path for path, _ in dataset.samples] == paths and dataset.targets == [-1] * 64 and dataset.classes == []
    assert len({os.path.dirname(path).count(os.sep) for path in paths}) == 4  # depths 0 to 3
    source = common.dataset_source("folder", str(tmp_path / "photos"))
    assert source.image_size == 32 and source.eval_dir == str(tmp_path / "photos")
    assert "photos has no train/: its images at any depth, unlabelled; no online probe; kNN and linear probe need " \
           "labelled images (--eval-data-dir): skipped" in capsys.readouterr().out
    image, label = source.make("pretrain", common.eval_transform(32, source.mean, source.std))[5]
    pixels = (np.asarray(Image.open(paths[5]).convert("RGB")) / 255 - source.mean) / source.std  # (H, W, 3)
    assert label == -1 and np.allclose(image.numpy(), pixels.transpose(2, 0, 1), atol=1e-6)
    os.makedirs(tmp_path / "empty" / "deeper")
    (tmp_path / "empty" / "deeper" / "notes.txt").write_text("no image")
    labelled = tmp_path / "labelled"
    os.makedirs(labelled / "train" / "c0")
    for data_dir, eval_dir, message in ((tmp_path / "empty", None, f"{tmp_path / 'empty'} holds no images ("),
                                        (labelled, tmp_path / "photos", "--eval-data-dir DIR (DIR/train/<class>/*"),
                                        (tmp_path / "photos", tmp_path / "photos", "--eval-data-dir DIR (DIR/train/")):
        with pytest.raises(SystemExit) as exit_info:
            common.dataset_source("folder", str(data_dir), eval_data_dir=eval_dir and str(eval_dir)).make("train", None)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {message}"), err
    bad = max(paths, key=lambda path: path.count(os.sep))  # an unreadable image at depth 3: one line, or left out
    with open(bad, "r+b") as f:
        f.truncate(100)
    common.UNREADABLE.clear()
    with pytest.raises(SystemExit):
        common.image_folder(str(tmp_path / "photos"), "pretrain", None, skip_bad=False)
    assert f"1 unreadable image in {tmp_path / 'photos'}: {bad}; fix or delete it" in capsys.readouterr().err
    kept = common.image_folder(str(tmp_path / "photos"), "pretrain", None, skip_bad=True)
    assert [path for path, _ in kept.samples] == [path for path in paths if path != bad] and len(kept.targets) == 63


def rankme_and_std_numpy(features):
    """RankMe (exp of the entropy of the normalised singular values) and the std of the L2-normalised rows x sqrt(D)."""
    singular = np.linalg.svd(features, compute_uv=False)
    p = singular / singular.sum()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), unit.std(axis=0, ddof=1).mean() * np.sqrt(features.shape[1])


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_unlabelled_images_pretrain_and_evaluate_the_label_free_diagnostics_alone(pipeline, tmp_path, monkeypatch,
                                                                                  capsys):
    """No kNN, no probes, one line saying so; rank and std of the clean images' features are the run's, restated in
    NumPy from backbone.pt and the image files; the online probe's loss is 0 (no labels); the end of the run is said."""
    if pipeline == "tensor" and not beside("tensor_pipeline"):
        pytest.skip("tensor_pipeline.py is not beside common.py")
    simclr = method_module("simclr")
    paths = write_unlabelled_tree(str(tmp_path / "photos"))
    monkeypatch.chdir(tmp_path)
    simclr.main(simclr.parse_args(folder_run(tmp_path / "photos", "--batch-size", "16", "--pipeline", pipeline,
                                             "--run-name", "own")))
    out = capsys.readouterr().out
    assert out.count("kNN and linear probe need labelled images (--eval-data-dir): skipped") == 1
    assert "kNN top-1" not in out and "done: runs/own/checkpoint.pt, backbone.pt, metrics.jsonl" in out
    records = [json.loads(line) for line in open("runs/own/metrics.jsonl")]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert all(set(r) == {"type", "epoch", "step", "rep_erank", "rep_std", "proj_erank", "proj_std", "ortho_error"}
               for r in evals)
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9)) and all(r["probe"] == 0 for r in train)
    backbone, _ = common.build_backbone("convnet", 32)
    backbone.load_state_dict(torch.load("runs/own/backbone.pt", weights_only=True))
    mean, std = common.NORMALIZATION["folder"]
    pixels = np.stack([(np.asarray(Image.open(path).convert("RGB")) / 255 - mean) / std for path in paths])
    with torch.no_grad():
        features = backbone.eval()(torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float32)).double().numpy()
    erank, spread = rankme_and_std_numpy(features)
    assert evals[-1]["rep_erank"] == pytest.approx(erank, rel=1e-4)
    assert evals[-1]["rep_std"] == pytest.approx(spread, rel=1e-4)


def test_unlabelled_images_evaluated_on_a_labelled_folder_and_resumed_bit_for_bit(tmp_path, monkeypatch, tiny_folder):
    """--eval-data-dir: kNN and the linear probe on its train/ and test/ (eval_linear.py, reading the same folder from
    the checkpoint, finds the same kNN), no online probe; SIGTERM mid-epoch, then --resume, ends with the weights of
    a run never stopped."""
    simclr = method_module("simclr")
    write_unlabelled_tree(str(tmp_path / "photos"))
    monkeypatch.chdir(tmp_path)
    argv = folder_run(tmp_path / "photos", "--batch-size", "16", "--eval-data-dir", str(tiny_folder))
    simclr.main(simclr.parse_args(argv + ["--run-name", "straight"]))
    evals = [r for r in map(json.loads, open("runs/straight/metrics.jsonl")) if r["type"] == "eval"]
    assert {"knn_top1", "knn5_top1", "knn5_euclidean_top1", "rep_erank"} <= set(evals[0]) and "linear_top1" in evals[-1]
    assert not any("online_top1" in r for r in evals)
    result = run_script("eval_linear.py", "--checkpoint", "runs/straight/checkpoint.pt", "--epochs", "1", "--device",
                        "cpu", "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0 and "(128 train / 32 test)" in result.stdout, result.stderr
    assert json.load(open("runs/straight/linear_eval.json"))["knn_top1"] == pytest.approx(evals[-1]["knn_top1"])
    result = run_signalled("simclr", 6, "SIGTERM", argv + ["--run-name", "stopped"], cwd=tmp_path)
    assert result.returncode == 143, result.stderr
    simclr.main(simclr.parse_args(["--resume", "runs/stopped/checkpoint.pt"]))
    straight, resumed = (torch.load(f"runs/{run}/checkpoint.pt", weights_only=True) for run in ("straight", "stopped"))
    assert resumed["global_step"] == 8
    assert all(torch.equal(resumed["model"][key], value) for key, value in straight["model"].items())
    steps = [r["step"] for r in map(json.loads, open("runs/stopped/metrics.jsonl")) if r["type"] == "train"]
    assert steps == list(range(1, 9))


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"backbone": nn.Linear(4, 3), "projector": nn.Linear(3, 2)})
    optimizer = common.build_optimizer("lars", model, lr=0.1, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model["projector"](model["backbone"](torch.randn(8, 4))).sum().backward()
    optimizer.step()
    args = SimpleNamespace(method="simclr", epochs=3, resume="elsewhere")  # resume: no args.json written
    path = str(tmp_path / "checkpoint.pt")
    run = common.Run(args, str(tmp_path), True, model, optimizer, scaler, None, torch.device("cpu"))
    run.save(epoch=2, global_step=17)
    assert run.saved == (2, 17)
    assert [name for name in os.listdir(tmp_path) if not name.startswith("events.")] == ["checkpoint.pt"]  # no .tmp
    expected_next_random = (torch.rand(3), np.random.rand(), random.random())

    fresh = nn.ModuleDict({"backbone": nn.Linear(4, 3), "projector": nn.Linear(3, 2)})
    fresh_optimizer = common.build_optimizer("lars", fresh, lr=0.1, weight_decay=1e-4)
    assert common.resume(path, fresh, fresh_optimizer, scaler) == (2, 17)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    buffers = [s["momentum_buffer"] for s in fresh_optimizer.state.values()]
    assert len(buffers) == 4 and all(torch.equal(a["momentum_buffer"], b) for a, b in
                                     zip(optimizer.state.values(), buffers))
    next_random = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(next_random[0], expected_next_random[0]) and next_random[1:] == expected_next_random[1:]


def test_corrupt_or_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    for bad in (str(path), str(tmp_path / "missing.pt")):
        with pytest.raises(SystemExit) as exit_info:
            common.load_checkpoint(bad)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_images_per_second_is_windowed_and_leaves_out_evaluation_and_checkpoints(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    args = SimpleNamespace(method="test", epochs=2, batch_size=10, log_every=2, eval_every=1, resume=None)
    model = nn.ModuleDict({"backbone": nn.Linear(2, 2)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = SimpleNamespace(train_loader=[None] * 3)  # 3 steps an epoch
    run = common.Run(args, str(tmp_path), True, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), data,
                     torch.device("cpu"))
    assert json.load(open(tmp_path / "args.json"))["epochs"] == 2
    loss = {"loss": torch.tensor(1.0)}
    for step, seconds in ((1, 1.0), (2, 1.0), (3, 0.25), (4, 0.25), (5, 0.5), (6, 0.5)):
        clock[0] += seconds
        run.train_step((step - 1) // 3, step, loss, lr=0.1)
        if step == 3:  # the end of epoch 1: a checkpoint and an evaluation that take 100 s
            slow = lambda *a, **k: clock.__setitem__(0, clock[0] + 100.0) or {"knn_top1": 50.0}  # noqa: E731
            with mock.patch.object(common, "evaluate", slow):
                run.end_of_epoch(0, 3)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rates = [r["images_per_s"] for r in records if r["type"] == "train"]
    assert rates == pytest.approx([10.0, 40.0, 20.0])  # 2 steps in 2 s; 2 in 0.5 s, not 100.5; 2 in 1 s
    assert [r["type"] for r in records] == ["train", "eval", "train", "train"] and records[1]["knn_top1"] == 50.0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["global_step"] == 3
    with pytest.raises(SystemExit):                                      # a NaN loss stops the run
        run.train_step(1, 6, {"loss": torch.tensor(float("nan"))}, lr=0.1)


def test_tensorboard_event_files_hold_every_number_of_metrics_jsonl_at_its_step_a_resumed_run_too(simclr,
                                                                                                   earlier_run,
                                                                                                   tmp_path):
    """A run stopped by SIGTERM after step 6 of 8, then resumed into its folder: its two event files, read back by
    TensorBoard's own reader, hold `type/key` for every number of every metrics.jsonl record, at the record's step,
    with its value (float32), in the order logged."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir, _ = copy_of(earlier_run, tmp_path)
    simclr.main(simclr.parse_args(["--resume", str(run_dir / "checkpoint.pt")]))
    assert len([name for name in os.listdir(run_dir) if name.startswith("events.out.tfevents.")]) == 2
    expected = {}
    for record in map(json.loads, open(run_dir / "metrics.jsonl")):
        for key, value in record.items():
            if key not in ("type", "step"):
                expected.setdefault(f"{record['type']}/{key}", []).append((record["step"], value))
    assert {"train/loss", "train/lr", "eval/knn_top1", "eval/rep_erank", "eval/linear_top1"} <= set(expected)
    reader = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    assert sorted(reader.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        logged = [(event.step, event.value) for event in reader.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        np.testing.assert_allclose([v for _, v in logged], [v for _, v in points], rtol=1e-6, err_msg=tag)
    assert [step for step, _ in expected["train/loss"]] == list(range(1, 9))


def test_without_tensorboard_a_run_says_so_in_one_line_and_writes_metrics_jsonl_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as when it is not installed
    args = SimpleNamespace(method="test", epochs=1, batch_size=10, log_every=1, eval_every=1, resume=None)
    model = nn.ModuleDict({"backbone": nn.Linear(2, 2)})
    run = common.Run(args, str(tmp_path), True, model, torch.optim.SGD(model.parameters(), lr=0.1),
                     torch.amp.GradScaler("cpu", enabled=False), SimpleNamespace(train_loader=[None] * 2),
                     torch.device("cpu"))
    for step in (1, 2):
        run.train_step(0, step, {"loss": torch.tensor(1.0)}, lr=0.1)
    out = capsys.readouterr().out
    assert out.count("tensorboard is not installed: metrics.jsonl alone (pip install tensorboard for event files)") == 1
    assert sorted(os.listdir(tmp_path)) == ["args.json", "metrics.jsonl"]


def test_resume_keeps_stored_arguments_and_refuses_changed_ones(simclr, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    simclr.main(simclr.parse_args(TINY_RUN + ["--epochs", "1", "--warmup-epochs", "0", "--run-name", "a",
                                              "--data-dir", "somewhere", "--eval-every", "5"]))
    args = simclr.parse_args(["--resume", "runs/a/checkpoint.pt", "--log-every=3"])
    assert (args.data_dir, args.log_every, args.synthetic_size, args.epochs, args.eval_every) == \
        ("somewhere", 3, 256, 1, 5)
    moved = simclr.parse_args(["--resume", "runs/a/checkpoint.pt", "--data-dir", "moved", "--eval-data-dir", "labels"])
    assert (moved.data_dir, moved.eval_data_dir, moved.log_every) == ("moved", "labels", 1)  # the data moved
    assert (args.image_size, args.pipeline, args.precision) == (32, "tensor", "fp32")  # resolved when it started
    capsys.readouterr()
    for argv, message in ((["--epochs", "9"], "not --epochs"), (["--eval-every=2"], "not --eval-every")):
        with pytest.raises(SystemExit):
            simclr.parse_args(["--resume", "runs/a/checkpoint.pt", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        simclr.parse_args(["--resume", "runs/a/checkpoint.pt", "--seed", "1"])
    assert ("only --device, --num-workers, --data-dir, --eval-data-dir, --log-every, --skip-bad-images may change, "
            "not --seed") in capsys.readouterr().err
    for path, message in (("runs/a/backbone.pt", "not a training checkpoint"), ("runs/a/nothing.pt", "no checkpoint")):
        with pytest.raises(SystemExit):
            simclr.parse_args(["--resume", path])
        assert message in capsys.readouterr().err
    intl = method_module("intl")
    with pytest.raises(SystemExit):
        intl.parse_args(["--resume", "runs/a/checkpoint.pt"])
    assert "is a simclr.py checkpoint; resume it with that script" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# What a user can rely on: bad flags, run folders, bad images, failed writes, errors and signals each end
# in one line, and the earlier run's checkpoint is never touched
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def earlier_run(simclr, tmp_path_factory):
    """A simclr run stopped by SIGTERM after step 6 of 8, in this process: its folder, to copy."""
    out_dir = tmp_path_factory.mktemp("earlier")
    argv = TINY_RUN + ["--arch", "convnet", "--out-dir", str(out_dir), "--run-name", "earlier"]
    with mock.patch.object(simclr, "optimizer_step", signal_after(simclr.optimizer_step, 6, "SIGTERM")), \
            pytest.raises(SystemExit) as stop:
        simclr.main(simclr.parse_args(argv))
    assert stop.value.code == 143
    return out_dir / "earlier"


def copy_of(run_dir, tmp_path):
    """A copy of a run folder under tmp_path/runs and the sha1 of its checkpoint."""
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy, hashlib.sha1((copy / "checkpoint.pt").read_bytes()).hexdigest()


def assert_one_line_and_untouched(result_or_err, run_dir, digest, code=None):
    """stderr is one line, no traceback; the run's checkpoint is byte-for-byte the same, no temporary file."""
    err = result_or_err if isinstance(result_or_err, str) else result_or_err.stderr
    if code is not None:
        assert result_or_err.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert hashlib.sha1((run_dir / "checkpoint.pt").read_bytes()).hexdigest() == digest
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
    return err


def test_bad_flags_unknown_device_and_an_out_dir_that_is_a_file_end_in_one_line(simclr, earlier_run, tmp_path):
    run_dir, digest = copy_of(earlier_run, tmp_path)
    for flags, message in ((["--base-lr", "-1"], "argument --base-lr: expected a number > 0, got -1"),
                           (["--batch-size", "1"], "argument --batch-size: expected an integer >= 2, got 1"),
                           (["--device", "tpu"], "--device tpu is not a device"),
                           (["--out-dir", str(run_dir / "args.json")], "is a file; name a folder")):
        result = run_script("simclr.py", *TINY_RUN, *flags, cwd=tmp_path)
        assert message in assert_one_line_and_untouched(result, run_dir, digest, code=2)
    for flags in (["--warmup-epochs", "3"], ["--precision", "fp16"], ["--ortho-weight", "1"]):  # combinations
        with pytest.raises(SystemExit) as exit_info:
            simclr.parse_args(TINY_RUN + flags)
        assert exit_info.value.code == 2


def test_a_run_folder_is_never_overwritten(simclr, earlier_run, tmp_path):
    run_dir, digest = copy_of(earlier_run, tmp_path)
    result = run_script("simclr.py", *TINY_RUN, "--run-name", "earlier", cwd=tmp_path)
    err = assert_one_line_and_untouched(result, run_dir, digest, code=2)
    assert "`python simclr.py --resume runs/earlier/checkpoint.pt`" in err and "another --run-name" in err
    os.makedirs(tmp_path / "runs" / "empty")  # a folder without a checkpoint, even an empty one, is not reused either
    result = run_script("simclr.py", *TINY_RUN, "--run-name", "empty", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: runs/empty exists already; choose another --run-name (or delete runs/empty)"
    assert os.listdir(tmp_path / "runs" / "empty") == []
    # a run that stops before writing anything leaves its name free
    result = run_script("simclr.py", "--dataset", "folder", "--data-dir", str(tmp_path / "nowhere"),
                        "--run-name", "bad", cwd=tmp_path)
    assert result.returncode == 2 and "no image folder" in result.stderr and not (tmp_path / "runs" / "bad").exists()


def claim_when_all_are_ready(barrier, args, codes, i):
    barrier.wait()
    try:
        common.claim_run_folder(args)
        codes[i] = 0
    except SystemExit as exit_info:
        codes[i] = exit_info.code


def test_runs_started_at_the_same_moment_under_one_name_never_share_its_folder(tmp_path):
    """8 processes claim one --run-name at once (a barrier): exactly one gets the folder, the others are refused
    (exit 2); the check and the creation are one step (os.makedirs), not a check and then a creation."""
    context = multiprocessing.get_context("fork")
    barrier, codes = context.Barrier(8), context.Array("i", [-1] * 8)
    args = SimpleNamespace(resume=None, out_dir=str(tmp_path / "runs"), run_name="same", method="simclr")
    processes = [context.Process(target=claim_when_all_are_ready, args=(barrier, args, codes, i)) for i in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert sorted(codes) == [0] + [2] * 7 and os.path.isdir(tmp_path / "runs" / "same")


def bad_image_folder(root):
    """DATA/train and DATA/test of 32 px JPEGs, two of the training images unreadable."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c in range(2):
            os.makedirs(root / split / f"c{c}")
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.jpg")
    truncated = root / "train" / "c0" / "3.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "train" / "c1" / "5.jpg").write_bytes(b"not an image")
    return [str(truncated), str(root / "train" / "c1" / "5.jpg")]


def test_unreadable_images_stop_the_run_by_default_and_are_left_out_with_skip_bad_images(simclr, 
        earlier_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run_dir, digest = copy_of(earlier_run, tmp_path)
    bad = bad_image_folder(tmp_path / "data")
    folder = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--batch-size", "8", "--epochs", "1",
              "--num-workers", "0", "--device", "cpu", "--arch", "convnet", "--log-every", "1"]
    result = run_script("simclr.py", *folder, cwd=tmp_path)  # the tensor pipeline: decoded once, before training
    err = assert_one_line_and_untouched(result, run_dir, digest, code=2)
    assert f"2 unreadable images in {tmp_path / 'data' / 'train'}: {bad[0]}, {bad[1]}; fix or delete them" in err
    for pipeline in ("tensor", "pil"):
        common.UNREADABLE.clear()
        with pytest.raises(SystemExit) as exit_info:
            common.build_data(simclr.parse_args(folder + ["--pipeline", pipeline]))
        assert exit_info.value.code == 2 and "--skip-bad-images" in capsys.readouterr().err
        common.UNREADABLE.clear()
        data = common.build_data(simclr.parse_args(folder + ["--pipeline", pipeline, "--skip-bad-images"]))
        assert len(data.eval_train_loader.dataset if pipeline == "pil" else data.eval_train_loader.images) == 22
        assert "skipped: 2 unreadable images" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    simclr.main(simclr.parse_args(folder + ["--pipeline", "pil", "--skip-bad-images", "--run-name", "skips"]))
    assert os.path.isfile(tmp_path / "runs" / "skips" / "backbone.pt")


def resume_in_process(run_dir, capsys, code, *patches):
    """Resume run_dir with (object, attribute, value) patches; returns its stderr."""
    simclr = method_module("simclr")
    capsys.readouterr()
    with contextlib.ExitStack() as stack:
        for target, attribute, value in patches:
            stack.enter_context(mock.patch.object(target, attribute, value))
        with pytest.raises(SystemExit) as exit_info:
            simclr.main(simclr.parse_args(["--resume", str(run_dir / "checkpoint.pt")]))
    assert exit_info.value.code == code
    return capsys.readouterr().err


def test_a_write_that_fails_ends_in_one_line_and_keeps_the_checkpoint(simclr, earlier_run, tmp_path, capsys):
    run_dir, digest = copy_of(earlier_run, tmp_path)
    real_save = torch.save

    def disk_full(obj, f):  # half a checkpoint, then the disk is full
        real_save({"model": obj["model"]} if isinstance(obj, dict) else obj, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    err = resume_in_process(run_dir, capsys, 1, (torch, "save", disk_full))
    assert_one_line_and_untouched(err, run_dir, digest)
    assert f"could not write {run_dir / 'checkpoint.pt'}: No space left on device" in err

    def limited():  # the OS refuses to write past 100 kB: a real failed write, in a subprocess
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run([sys.executable, os.path.join(HERE, "simclr.py"), "--resume", "runs/earlier/checkpoint.pt"],
                            cwd=tmp_path, preexec_fn=limited, capture_output=True, text=True, timeout=300)
    err = assert_one_line_and_untouched(result, run_dir, digest, code=1)
    assert "checkpoint.pt: File too large" in err
    if os.geteuid() != 0:  # root writes into read-only folders
        os.chmod(run_dir, 0o555)
        try:
            result = run_script("simclr.py", "--resume", "runs/earlier/checkpoint.pt", cwd=tmp_path)
        finally:
            os.chmod(run_dir, 0o755)
        assert "Permission denied" in assert_one_line_and_untouched(result, run_dir, digest, code=1)
    json_path = tmp_path / "linear_eval.json"
    with mock.patch.object(json, "dump", side_effect=OSError(errno.EROFS, os.strerror(errno.EROFS))), \
            pytest.raises(SystemExit):
        common.atomic_write(str(json_path), "w", lambda f: json.dump({}, f))
    assert "Read-only file system" in capsys.readouterr().err
    assert not json_path.exists() and not (tmp_path / "linear_eval.json.tmp").exists()


def test_errors_a_user_cannot_fix_in_the_code_end_in_one_line_and_a_bug_shows_its_traceback(simclr, earlier_run,
                                                                                              tmp_path, capsys):
    run_dir, digest = copy_of(earlier_run, tmp_path)
    out_of_memory = mock.Mock(side_effect=torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    err = resume_in_process(run_dir, capsys, 1, (simclr, "optimizer_step", out_of_memory))
    assert_one_line_and_untouched(err, run_dir, digest)
    assert "out of memory" in err and f"--resume {os.path.relpath(run_dir / 'checkpoint.pt')}" in err
    vanished = mock.Mock(side_effect=FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.jpg"))
    err = resume_in_process(run_dir, capsys, 1, (simclr, "online_probe_loss", vanished))
    assert "could not read the data" in assert_one_line_and_untouched(err, run_dir, digest)
    # a bug in the code a reader changed (a shape error in the loss): Python's traceback, not one line
    bug = mock.Mock(side_effect=RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x256 and 128x256)"))
    capsys.readouterr()
    with mock.patch.object(simclr, "nt_xent_loss", bug), pytest.raises(RuntimeError, match="mat1 and mat2"):
        simclr.main(simclr.parse_args(["--resume", str(run_dir / "checkpoint.pt")]))
    err = capsys.readouterr().err
    assert err.strip() == ("error: the code raised an exception (its traceback follows); once fixed, continue from "
                           f"the checkpoint with `python simclr.py --resume "
                           f"{os.path.relpath(run_dir / 'checkpoint.pt')}`")
    assert hashlib.sha1((run_dir / "checkpoint.pt").read_bytes()).hexdigest() == digest
    result = subprocess.run([sys.executable, "-c", "import simclr, sys; from unittest import mock; "
                             "mock.patch.object(simclr, 'nt_xent_loss', lambda *a: 1 / 0).start(); "
                             "simclr.main(simclr.parse_args(sys.argv[1:]))", "--resume", "runs/earlier/checkpoint.pt"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE}, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().endswith("ZeroDivisionError: division by zero")


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(simclr, earlier_run, tmp_path, capsys):
    run_dir, digest = copy_of(earlier_run, tmp_path)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    twice = signal_after(simclr.optimizer_step, 1, "SIGINT", "SIGINT")  # during the resumed run's first step
    err = resume_in_process(run_dir, capsys, 130, (simclr, "optimizer_step", twice))
    assert "SIGINT again: stopped at once; continue from the checkpoint with `python simclr.py --resume" in \
        assert_one_line_and_untouched(err, run_dir, digest)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
