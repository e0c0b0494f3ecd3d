"""VICReg (vicreg.py): eq. (6) against NumPy loops and the official code's formula, analytic values, the recipe
pinned to its source, the training step against a hand computation, and the script end to end."""
import math

import numpy as np
import pytest
import torch

import vicreg
from conftest import (check_end_to_end, check_learns_offline, check_signal_resume, first_training_step, folder_run,
                      probe_and_penalty_numpy, two_view_outputs)


def vicreg_official(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """facebookresearch/vicreg's VICReg.forward on one GPU, restated in NumPy, with its off_diagonal
    (flatten, drop the last entry, view as (n-1, n+1), drop the first column)."""
    n, d = x.shape

    def off_diagonal(m):
        return m.flatten()[:-1].reshape(d - 1, d + 1)[:, 1:].flatten()

    repr_loss = np.mean((x - y) ** 2)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    std_x, std_y = np.sqrt(x.var(axis=0, ddof=1) + 0.0001), np.sqrt(y.var(axis=0, ddof=1) + 0.0001)
    std_loss = np.mean(np.maximum(0, 1 - std_x)) / 2 + np.mean(np.maximum(0, 1 - std_y)) / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    cov_loss = (off_diagonal(cov_x) ** 2).sum() / d + (off_diagonal(cov_y) ** 2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss, (repr_loss, std_loss, cov_loss)


def vicreg_eq6_numpy(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """Eq. (6) of the paper with explicit loops over dimensions (solo-learn's CIFAR form: the variance
    terms of the two views summed, not halved)."""
    n, d = x.shape
    invariance = sum(((x[:, j] - y[:, j]) ** 2).mean() for j in range(d)) / d
    variance = covariance = 0.0
    for z in (x, y):
        variance += np.mean([max(0.0, 1 - math.sqrt(z[:, j].var(ddof=1) + 1e-4)) for j in range(d)])
        c = np.cov(z, rowvar=False, ddof=1)
        covariance += sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, (invariance, variance, covariance)


@pytest.mark.parametrize("n,d", [(2, 3), (16, 8), (64, 24), (24, 64)])
@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 0.5, 3.0)])
def test_vicreg_loss_is_eq_6_and_std_coeff_halved_is_the_official_formula(n, d, coeffs):
    rng = np.random.default_rng(n * d)
    z1, z2 = rng.normal(size=(n, d)) * rng.uniform(0.1, 2, size=d), rng.normal(size=(n, d))
    loss, terms = vicreg.vicreg_loss(torch.from_numpy(z1), torch.from_numpy(z2), *coeffs)
    expected, (inv, var, cov) = vicreg_eq6_numpy(z1, z2, *coeffs)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert (terms["invariance"].item(), terms["variance"].item(), terms["covariance"].item()) == \
        pytest.approx((inv, var, cov), rel=1e-10)
    sim, std, cov_coeff = coeffs  # the official code's halved variance is eq. (6) at std_coeff / 2
    halved, _ = vicreg.vicreg_loss(torch.from_numpy(z1), torch.from_numpy(z2), sim, std / 2, cov_coeff)
    assert halved.item() == pytest.approx(vicreg_official(z1, z2, *coeffs)[0], rel=1e-10)
    assert loss.item() - halved.item() == pytest.approx(std / 2 * var, rel=1e-9)


def test_vicreg_loss_analytic_values():
    # equal views with decorrelated unit-variance dimensions: every term is zero
    q = torch.randn(64, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(q - q.mean(dim=0))                          # orthonormal, centred columns
    z = q * math.sqrt(63) * 1.5                                         # Var = 2.25 per dimension, C diagonal
    loss, terms = vicreg.vicreg_loss(z, z.clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    # both views collapsed to one point: std = sqrt(1e-4) = 0.01 in every dimension, C = 0
    point = torch.randn(1, 8, dtype=torch.float64).expand(64, 8)
    loss, terms = vicreg.vicreg_loss(point, point)
    assert terms["variance"].item() == pytest.approx(2 * 0.99) and loss.item() == pytest.approx(25 * 2 * 0.99)
    # rank one: Var = 1 in every dimension (no variance penalty), C = all ones, so c = (D^2 - D) / D each
    line = torch.randn(64, 1, dtype=torch.float64)
    line = (line - line.mean()) / line.std()
    loss, terms = vicreg.vicreg_loss(line.expand(64, 8), line.expand(64, 8))
    assert terms["covariance"].item() == pytest.approx(2 * 7, rel=1e-9) and terms["variance"].item() == 0


def test_off_diagonal_sum_equals_the_masked_sum():
    m = torch.randn(7, 7, dtype=torch.float64)
    mask = ~torch.eye(7, dtype=torch.bool)
    assert vicreg.off_diagonal_squared_sum(m).item() == pytest.approx(m[mask].pow(2).sum().item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# The recipe, the training step and the script
# ----------------------------------------------------------------------------------------------
# solo-learn fca55e3 (the commit that posted 92.07): bash_files/pretrain/cifar/vicreg.sh, solo/methods/base.py
PINNED_RECIPE = dict(epochs=1000, batch_size=256, optimizer="lars", base_lr=0.3, weight_decay=1e-4,  # vicreg.sh
                     warmup_epochs=10, final_lr_ratio=0.0, augmentations="vicreg", probe_lr=0.3,  # base.py default
                     blur_p=None, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, proj_hidden_dim=2048, proj_dim=2048)


def test_the_recipe_is_pinned_to_its_source():
    args = vicreg.parse_args(["--dataset", "cifar10", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_RECIPE} == PINNED_RECIPE


# solo-learn fca55e3 bash_files/pretrain/imagenet-100/vicreg.sh (batch 128 x 2 GPUs), solo/args defaults
PINNED_IMAGENET100 = dict(dataset="folder", arch="resnet18", epochs=400, batch_size=256, optimizer="lars", base_lr=0.3,
                          weight_decay=1e-4, warmup_epochs=10, final_lr_ratio=0.0, augmentations="vicreg",
                          probe_lr=0.3, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, proj_hidden_dim=2048,
                          proj_dim=2048)


def test_the_imagenet100_recipe_is_pinned_to_its_source():
    """At 224 px the recipe's views are solo-learn's ImageNet-100 ones too (blur and solarisation by view)."""
    args = vicreg.parse_args(["--recipe", "imagenet100", "--data-dir", "IN100", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_IMAGENET100} == PINNED_IMAGENET100


def test_the_offline_check_trains_the_convnet_without_blur_and_flags_still_win():
    args = vicreg.parse_args(["--dataset", "synthetic"])
    assert (args.arch, args.epochs, args.blur_p, args.optimizer, args.base_lr) == ("convnet", 40, 0.0, "lars", 0.3)
    assert vicreg.parse_args(["--dataset", "synthetic", "--blur-p", "0.5"]).blur_p == 0.5


def test_the_training_step_backpropagates_eq_6_plus_the_probe_plus_the_weighted_penalty(tmp_path, monkeypatch,
                                                                                       tiny_folder):
    monkeypatch.chdir(tmp_path)
    coefficients = ("--sim-coeff", "2", "--std-coeff", "3", "--cov-coeff", "0.5")
    step = first_training_step(vicreg, folder_run(tiny_folder, "--epochs", "1", *coefficients, "--proj-hidden-dim",
                                                  "64", "--proj-dim", "48", "--ortho", "so", "--ortho-weight", "0.01"))
    model, ((x1, x2), labels) = step.model, step.batch
    features, (z1, z2) = two_view_outputs(model, x1, x2)
    expected = (vicreg_eq6_numpy(z1.double().numpy(), z2.double().numpy(), 2.0, 3.0, 0.5)[0]
                + probe_and_penalty_numpy(model, features, labels, 0.01))
    assert step.loss == pytest.approx(expected, rel=1e-5)


def test_the_script_trains_end_to_end(tiny_run):
    check_end_to_end(tiny_run("vicreg"), PINNED_RECIPE["base_lr"], ("invariance", "variance", "covariance"))


def test_a_run_stopped_by_a_signal_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_folder):
    check_signal_resume(vicreg, tmp_path, monkeypatch, tiny_folder, "pil", "0", "none", "SIGINT")


@pytest.mark.slow
def test_the_offline_check_learns(tmp_path):
    check_learns_offline("vicreg", tmp_path)
