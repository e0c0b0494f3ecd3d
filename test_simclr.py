"""SimCLR (simclr.py): NT-Xent against a NumPy re-derivation and its analytic values, the recipe pinned to its
source, the training step against a hand computation, and the script end to end."""
import math

import numpy as np
import pytest
import torch

import simclr
from conftest import (check_end_to_end, check_learns_offline, check_signal_resume, first_training_step, folder_run,
                      probe_and_penalty_numpy, two_view_outputs)


def nt_xent_numpy(z1, z2, temperature):
    """Eq. (1) of the SimCLR paper with explicit loops over anchors and candidates."""
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    losses = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denominator = sum(math.exp(z[i] @ z[k] / temperature) for k in range(n2) if k != i)
        losses.append(-math.log(math.exp(z[i] @ z[j] / temperature) / denominator))
    return float(np.mean(losses))


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n,d", [(2, 3), (8, 16), (32, 128)])
def test_nt_xent_matches_numpy_loops(n, d, temperature):
    rng = np.random.default_rng(n * d)
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    loss = simclr.nt_xent_loss(torch.from_numpy(z1), torch.from_numpy(z2), temperature)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(nt_xent_numpy(z1, z2, temperature), rel=1e-9)


@pytest.mark.parametrize("n", [2, 5, 64])
def test_nt_xent_collinear_embeddings_give_log_2n_minus_1(n):
    # every similarity is 1, so each anchor's positive is one of 2N - 1 equal terms
    direction = torch.randn(1, 7, dtype=torch.float64)
    scales = torch.rand(n, 1, dtype=torch.float64) + 0.5
    loss = simclr.nt_xent_loss(direction * scales, direction * scales.flip(0), temperature=0.2)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-9)


def test_nt_xent_invariances_and_fp32_stability():
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    loss = simclr.nt_xent_loss(z1, z2)
    assert simclr.nt_xent_loss(z2, z1).item() == pytest.approx(loss.item(), rel=1e-6)           # view swap
    assert simclr.nt_xent_loss(3 * z1, 0.1 * z2).item() == pytest.approx(loss.item(), rel=1e-5)  # scale
    perm = torch.randperm(16)
    assert simclr.nt_xent_loss(z1[perm], z2[perm]).item() == pytest.approx(loss.item(), rel=1e-5)
    # a tiny temperature would overflow a naive exp; log-sum-exp keeps the loss finite
    assert torch.isfinite(simclr.nt_xent_loss(z1, z2, temperature=1e-3))
    # matched views give a lower loss than unrelated ones
    assert simclr.nt_xent_loss(z1, z1 + 0.01 * torch.randn(16, 32)) < loss


# ----------------------------------------------------------------------------------------------
# The recipe, the training step and the script
# ----------------------------------------------------------------------------------------------
# solo-learn fca55e3 (the commit that posted 90.74): bash_files/pretrain/cifar/simclr.sh, solo/methods/base.py
PINNED_RECIPE = dict(epochs=1000, batch_size=256, optimizer="lars", base_lr=0.4, weight_decay=1e-5,  # simclr.sh
                     warmup_epochs=10, final_lr_ratio=0.0, augmentations="symmetric", probe_lr=0.1,  # base.py
                     blur_p=None, temperature=0.2, proj_hidden_dim=2048, proj_dim=256)


def test_the_recipe_is_pinned_to_its_source():
    args = simclr.parse_args(["--dataset", "cifar10", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_RECIPE} == PINNED_RECIPE


# solo-learn fca55e3 bash_files/pretrain/imagenet-100/simclr.sh (the first run; batch 128 x 2 GPUs), solo/args defaults
PINNED_IMAGENET100 = dict(dataset="folder", arch="resnet18", epochs=400, batch_size=256, optimizer="lars", base_lr=0.3,
                          weight_decay=1e-4, warmup_epochs=10, final_lr_ratio=0.0, augmentations="symmetric",
                          probe_lr=0.3, temperature=0.2, proj_hidden_dim=2048, proj_dim=128)


def test_the_imagenet100_recipe_is_pinned_to_its_source():
    """At 224 px the recipe's views are solo-learn's ImageNet-100 ones too (blur and solarisation by view)."""
    args = simclr.parse_args(["--recipe", "imagenet100", "--data-dir", "IN100", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_IMAGENET100} == PINNED_IMAGENET100


def test_multi_crop_views_are_intls_and_refused_here_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        simclr.parse_args(["--augmentations", "multicrop", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --augmentations multicrop makes 6 views; simclr.py trains on two\n"


def test_the_offline_check_trains_the_convnet_without_blur_and_flags_still_win():
    """Blur erases the synthetic textures at 32 px (RESULTS.md §12); the CIFAR recipe keeps solo-learn's 0.5."""
    args = simclr.parse_args(["--dataset", "synthetic"])
    assert (args.arch, args.epochs, args.blur_p, args.optimizer, args.base_lr) == ("convnet", 40, 0.0, "lars", 0.4)
    assert simclr.parse_args(["--dataset", "synthetic", "--blur-p", "0.5"]).blur_p == 0.5


def test_the_training_step_backpropagates_nt_xent_plus_the_probe_plus_the_weighted_penalty(tmp_path, monkeypatch,
                                                                                          tiny_folder):
    monkeypatch.chdir(tmp_path)
    step = first_training_step(simclr, folder_run(tiny_folder, "--epochs", "1", "--temperature", "0.3",
                                                  "--ortho", "so", "--ortho-weight", "0.01"))
    model, ((x1, x2), labels) = step.model, step.batch
    features, (z1, z2) = two_view_outputs(model, x1, x2)
    expected = (nt_xent_numpy(z1.double().numpy(), z2.double().numpy(), 0.3)
                + probe_and_penalty_numpy(model, features, labels, 0.01))
    assert step.loss == pytest.approx(expected, rel=1e-5)


def test_the_script_trains_end_to_end(tiny_run):
    check_end_to_end(tiny_run("simclr"), PINNED_RECIPE["base_lr"], logged_terms=())


@pytest.mark.parametrize("pipeline,workers,signame", [("tensor", "0", "SIGINT"), ("pil", "2", "SIGTERM")])
def test_a_run_stopped_by_a_signal_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_folder,
                                                                         pipeline, workers, signame):
    check_signal_resume(simclr, tmp_path, monkeypatch, tiny_folder, pipeline, workers, "none", signame)


@pytest.mark.slow
def test_the_offline_check_learns(tmp_path):
    check_learns_offline("simclr", tmp_path)
