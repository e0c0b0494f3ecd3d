"""INTL (intl.py): IterNorm, the trace loss and the INTL objective against NumPy re-derivations and analytic
values, the spectrum diagnostics, the recipe pinned to its source, the training step against a hand
computation, and the script end to end. Needs only intl.py, common.py and conftest.py beside it."""
import math

import numpy as np
import pytest
import torch

import intl
from conftest import (check_end_to_end, check_learns_offline, check_signal_resume, conv_and_linear_weights,
                      first_training_step, folder_run, probe_loss_numpy, so_numpy)


def iter_norm_numpy(z, iters, axis):
    """The IterNorm recipe of the INTL issue with explicit loops: centre, covariance, Newton steps."""
    z = np.asarray(z, dtype=np.float64)
    if axis == 0:
        x = np.array([row - row.mean() for row in z])
        m = x.shape[1] - 1
        sigma = np.array([[x[i] @ x[j] / m for j in range(len(x))] for i in range(len(x))])
    else:
        x = z - z.mean(axis=0)
        sigma = np.array([[x[:, i] @ x[:, j] / (len(x) - 1) for j in range(x.shape[1])] for i in range(x.shape[1])])
    trace = np.trace(sigma)
    p = np.eye(len(sigma))
    for _ in range(iters):
        p = 1.5 * p - 0.5 * np.linalg.matrix_power(p, 3) @ (sigma / trace)
    w = p / np.sqrt(trace)
    return w @ x if axis == 0 else x @ w


def trace_loss_numpy(z_hat, axis):
    rows = z_hat if axis == 0 else z_hat.T
    return sum((1 - np.var(row, ddof=1)) ** 2 for row in rows)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("n,d,iters", [(4, 6, 1), (8, 16, 4), (32, 12, 4), (16, 64, 7)])
def test_iter_norm_and_trace_loss_match_numpy(n, d, iters, axis):
    rng = np.random.default_rng(n * d + axis)
    z = rng.normal(size=(n, d)) * rng.uniform(0.2, 3, size=d) + rng.normal(size=d)
    z_hat = intl.iter_norm(torch.from_numpy(z), iters, axis)
    expected = iter_norm_numpy(z, iters, axis)
    assert z_hat.shape == (n, d)
    np.testing.assert_allclose(z_hat.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert intl.trace_loss(z_hat, axis).item() == pytest.approx(trace_loss_numpy(expected, axis), rel=1e-9)


@pytest.mark.parametrize("c", [0.3, 4.0])
def test_iter_norm_of_an_isotropic_batch_is_the_input_at_unit_trace_times_the_newton_scalar(c):
    # rows centred over the features and orthogonal: Sigma = c I (N x N), so Sigma_N = I / N, every
    # P_k = p_k I with p_k = 1.5 p_(k-1) - 0.5 p_(k-1)^3 / N, and the output is p_T X / sqrt(tr Sigma)
    n, d = 8, 20
    a = torch.randn(d, n, dtype=torch.float64)
    a = a - a.mean(dim=0)                                               # columns orthogonal to ones
    q, _ = torch.linalg.qr(a)
    x = q.T * math.sqrt(c * (d - 1))                                    # (N, D), X X^T / (D - 1) = c I
    shifted = x + torch.randn(n, 1, dtype=torch.float64)               # a per-sample offset is centred away
    p = 1.0
    for _ in range(4):
        p = 1.5 * p - 0.5 * p ** 3 / n
    z_hat = intl.iter_norm(shifted, iters=4, axis=0)
    torch.testing.assert_close(z_hat, p * x / math.sqrt(c * n), rtol=1e-10, atol=1e-10)
    # every row variance is p_T^2 / N: TL = N (1 - p_T^2 / N)^2
    assert intl.trace_loss(z_hat).item() == pytest.approx(n * (1 - p ** 2 / n) ** 2, rel=1e-9)


@pytest.mark.parametrize("axis", [0, 1])
def test_iter_norm_approaches_the_identity_covariance_as_iterations_grow(axis):
    # well conditioned: eigenvalues of Sigma between 1 and 3
    n, d = (8, 64) if axis == 0 else (256, 8)
    size = n if axis == 0 else d
    u, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))
    base = torch.randn(n, d, dtype=torch.float64)
    z = (u @ torch.diag(torch.linspace(1, 3, size, dtype=torch.float64).sqrt()) @ u.T @ base) if axis == 0 \
        else base @ u @ torch.diag(torch.linspace(1, 3, size, dtype=torch.float64).sqrt())
    errors = []
    for iters in (1, 2, 4, 8, 16):  # far beyond, rounding errors grow: Newton's uncoupled iteration is unstable
        z_hat = intl.iter_norm(z, iters, axis)
        x = z_hat - z_hat.mean(dim=1 if axis == 0 else 0, keepdim=True)
        cov = x @ x.T / (d - 1) if axis == 0 else x.T @ x / (n - 1)
        errors.append(torch.linalg.matrix_norm(cov - torch.eye(size, dtype=torch.float64)).item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 and errors[0] > 0.5, errors


def test_iter_norm_passes_gradients_through_the_whitening_matrix():
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for axis in (0, 1):
        assert torch.autograd.gradcheck(lambda t: intl.iter_norm(t, 3, axis), (z,))


def test_intl_loss_matches_numpy_and_uses_the_authors_beta():
    rng = np.random.default_rng(0)
    for n, d, axis in [(16, 32, 0), (32, 16, 1), (256, 64, 0)]:
        z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        h1, h2 = iter_norm_numpy(z1, 4, axis), iter_norm_numpy(z2, 4, axis)
        cosine = np.sum(h1 * h2, axis=1) / np.linalg.norm(h1, axis=1) / np.linalg.norm(h2, axis=1)
        beta = 0.01 * (math.log2(n if axis == 0 else d) - 3)
        expected = 2 - 2 * cosine.mean() + beta * (trace_loss_numpy(h1, axis) + trace_loss_numpy(h2, axis))
        loss, terms = intl.intl_loss(torch.from_numpy(z1), torch.from_numpy(z2), axis=axis)
        assert loss.item() == pytest.approx(expected, rel=1e-9)
        assert terms["alignment"].item() == pytest.approx(2 - 2 * cosine.mean(), rel=1e-9)
    # beta = 0.05 at batch 256 (axis 0) and 0.08 at D = 2048 (axis 1)
    z1, z2 = torch.randn(256, 64, dtype=torch.float64), torch.randn(256, 64, dtype=torch.float64)
    assert intl.intl_loss(z1, z2)[0].item() == pytest.approx(intl.intl_loss(z1, z2, beta=0.05)[0].item(), rel=1e-12)
    z1, z2 = torch.randn(16, 2048, dtype=torch.float64), torch.randn(16, 2048, dtype=torch.float64)
    assert intl.intl_loss(z1, z2, iters=1, axis=1)[0].item() == \
        pytest.approx(intl.intl_loss(z1, z2, iters=1, axis=1, beta=0.08)[0].item(), rel=1e-12)
    # identical views: no alignment loss, and both views' gradients flow (no stop-gradient)
    z1 = torch.randn(16, 32, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    loss, terms = intl.intl_loss(z1, z2, beta=0.0)
    assert terms["alignment"].item() == pytest.approx(0.0, abs=1e-6)
    intl.intl_loss(z1, z2 + 0.1 * torch.randn(16, 32))[0].backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("axis", [0, 1])
def test_spectrum_stats_report_the_effective_rank_before_and_after_whitening(axis):
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([4.0, 3, 2, 1.5, 1, 0.8, 0.6, 0.5], dtype=torch.float64)  # uneven spectrum
    base = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    z = base * scales if axis == 1 else (base * scales).T                   # axis 0: 8 samples of 64 features
    stats = intl.spectrum_stats(z, iters=12, axis=axis)
    x = z - z.mean(dim=1 - axis, keepdim=True)
    eigenvalues = np.linalg.eigvalsh((x.T @ x if axis == 1 else x @ x.T).numpy())
    p = eigenvalues / eigenvalues.sum()
    assert stats["z_erank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert stats["z_erank"] < 6 and stats["zhat_erank"] == pytest.approx(8, rel=1e-6)  # whitened: all equal
    # rank of a full batch: min(N, D - 1) for axis 0, min(N - 1, D) for axis 1
    wide = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    assert intl.spectrum_stats(wide, iters=12, axis=0)["zhat_erank"] == pytest.approx(16, rel=1e-6)
    assert intl.spectrum_stats(wide.T.contiguous(), iters=12, axis=1)["zhat_erank"] == pytest.approx(16, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The recipe, the training step and the script
# ----------------------------------------------------------------------------------------------
# winci-ai/INTL 0aa69af: scripts/cifar10.sh, cifar/main.py, cifar/cfg.py
PINNED_RECIPE = dict(epochs=1000, batch_size=256, optimizer="sgd", base_lr=0.3, weight_decay=1e-4,  # cifar10.sh
                     warmup_epochs=2, final_lr_ratio=0.001, augmentations="asymmetric", probe_lr=0.1,  # main.py
                     blur_p=None, iters=4, axis=0, beta=None, proj_hidden_dim=2048, proj_dim=2048)


def test_the_recipe_is_pinned_to_its_source():
    args = intl.parse_args(["--dataset", "cifar10", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_RECIPE} == PINNED_RECIPE


def test_the_offline_check_trains_the_convnet_with_the_recipe():
    args = intl.parse_args(["--dataset", "synthetic"])
    assert (args.arch, args.epochs, args.blur_p, args.optimizer, args.base_lr, args.weight_decay) == \
        ("convnet", 40, None, "sgd", 0.3, 1e-4)


def test_the_training_step_backpropagates_the_intl_objective_plus_the_probe_plus_the_weighted_penalty(
        tmp_path, monkeypatch, tiny_folder):
    """Each view whitened on its own in fp32, beta = 0.01 (log2 32 - 3) = 0.02 at batch 32, no stop-gradient."""
    monkeypatch.chdir(tmp_path)
    step = first_training_step(intl, folder_run(tiny_folder, "--epochs", "1", "--proj-hidden-dim", "64", "--proj-dim",
                                                "48", "--ortho", "so", "--ortho-weight", "0.01"))
    model, ((x1, x2), labels) = step.model, step.batch
    with torch.no_grad():
        h1, h2 = model["backbone"](x1), model["backbone"](x2)
        z1, z2 = model["projector"](h1), model["projector"](h2)
    w1, w2 = (iter_norm_numpy(z.double().numpy(), 4, 0) for z in (z1, z2))
    cosine = np.sum(w1 * w2, axis=1) / np.linalg.norm(w1, axis=1) / np.linalg.norm(w2, axis=1)
    intl_term = 2 - 2 * cosine.mean() + 0.02 * (trace_loss_numpy(w1, 0) + trace_loss_numpy(w2, 0))
    expected = (intl_term + probe_loss_numpy(model["online_probe"], (h1, h2), labels)
                + 0.01 * so_numpy(conv_and_linear_weights(model["backbone"])))
    assert step.loss == pytest.approx(expected, rel=1e-4)


def test_the_script_trains_end_to_end(tiny_run):
    check_end_to_end(tiny_run("intl"), PINNED_RECIPE["base_lr"], logged_terms=("alignment", "trace", "z_erank",
                                                                                "zhat_erank"))


def test_a_run_stopped_by_a_signal_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_folder):
    check_signal_resume(intl, tmp_path, monkeypatch, tiny_folder, "pil", "0", "none", "SIGTERM")


@pytest.mark.slow
def test_the_offline_check_learns(tmp_path):
    check_learns_offline("intl", tmp_path)
