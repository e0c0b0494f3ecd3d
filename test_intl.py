"""INTL (intl.py): IterNorm, the trace loss and the INTL objective against NumPy re-derivations and analytic
values, the spectrum diagnostics, the recipe pinned to its source, the training step against a hand
computation, and the script end to end. Needs only intl.py, common.py and conftest.py beside it."""
import json
import math

import numpy as np
import pytest
import torch

import intl
from conftest import (beside, check_end_to_end, check_learns_offline, check_signal_resume, first_training_step,
                      folder_run, probe_and_penalty_numpy, probe_loss_numpy, run_script, two_view_outputs,
                      write_image_folder)


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
    features, (z1, z2) = two_view_outputs(model, x1, x2)
    w1, w2 = (iter_norm_numpy(z.double().numpy(), 4, 0) for z in (z1, z2))
    cosine = np.sum(w1 * w2, axis=1) / np.linalg.norm(w1, axis=1) / np.linalg.norm(w2, axis=1)
    intl_term = 2 - 2 * cosine.mean() + 0.02 * (trace_loss_numpy(w1, 0) + trace_loss_numpy(w2, 0))
    expected = intl_term + probe_and_penalty_numpy(model, features, labels, 0.01)
    assert step.loss == pytest.approx(expected, rel=1e-4)


def test_the_script_trains_end_to_end(tiny_run):
    check_end_to_end(tiny_run("intl"), PINNED_RECIPE["base_lr"], logged_terms=("alignment", "trace", "z_erank",
                                                                                "zhat_erank"))


def test_a_run_stopped_by_a_signal_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_folder):
    check_signal_resume(intl, tmp_path, monkeypatch, tiny_folder, "pil", "0", "none", "SIGTERM")


@pytest.mark.slow
def test_the_offline_check_learns(tmp_path):
    check_learns_offline("intl", tmp_path)


# ----------------------------------------------------------------------------------------------
# Beyond CIFAR: the ImageNet-100 and ImageNet recipes, multi-crop and the EMA target (intl_m)
# ----------------------------------------------------------------------------------------------
# winci-ai/INTL 0aa69af: scripts/in100.sh and scripts/ep800_multi-crop_ema.sh with cfg.py's defaults (bs 256,
# wd 1e-5, warmup_eps 2, emb and projection_size 8192, m 0.996); main.py: SGD 0.9, no decay where param.ndim == 1;
# src/model.py: zero_init for every arch but resnet18
PINNED_IMAGENET = {
    "imagenet100": dict(dataset="folder", arch="resnet18", zero_init_residual=False, epochs=400, batch_size=128,
                        optimizer="sgd-norms-excluded", base_lr=0.5, weight_decay=2.5e-5, warmup_epochs=2,
                        final_lr_ratio=0.001, augmentations="asymmetric", proj_hidden_dim=4096, proj_dim=8192,
                        ema=False, iters=4, axis=0, beta=None),
    "imagenet": dict(dataset="folder", arch="resnet50", zero_init_residual=True, epochs=800, batch_size=256,
                     optimizer="sgd-norms-excluded", base_lr=0.3, weight_decay=1e-5, warmup_epochs=2,
                     final_lr_ratio=0.001, augmentations="multicrop", proj_hidden_dim=8192, proj_dim=8192, ema=True,
                     ema_base=0.996, iters=4, axis=0, beta=None),
}


@pytest.mark.parametrize("recipe", PINNED_IMAGENET)
def test_the_imagenet_recipes_are_pinned_to_their_sources(recipe):
    args = intl.parse_args(["--recipe", recipe, "--data-dir", "IMAGENET", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_IMAGENET[recipe]} == PINNED_IMAGENET[recipe]
    assert args.eval_every == args.epochs // 10
    args = intl.parse_args(["--recipe", recipe, "--no-ema", "--zero-init-residual", "--data-dir", "IN",
                            "--device", "cpu"])
    assert (args.ema, args.zero_init_residual) == (False, True)  # a recipe's switch: a default a flag beats either way


def test_multi_view_loss_pairs_every_view_with_view_0_or_with_the_ema_target_as_the_authors_code():
    """methods/intl.py: each view i >= 1 against view 0, both with gradient, trace beta (TL_i + TL_0), the sum over
    pairs divided by their number; methods/intl_m.py: each online view against the whitened target, beta TL_i,
    divided by the number of online views. A NumPy re-derivation of both, and two views without a target is
    intl_loss."""
    rng = np.random.default_rng(0)
    n, d, views = 16, 24, 4
    zs = [rng.normal(size=(n, d)) for _ in range(views)]
    target = rng.normal(size=(n, d))
    beta = 0.01 * (math.log2(n) - 3)
    whitened = [iter_norm_numpy(z, 4, 0) for z in zs]
    cosine = lambda a, b: np.mean(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))  # noqa
    pairs = [2 - 2 * cosine(w, whitened[0]) + beta * (trace_loss_numpy(w, 0) + trace_loss_numpy(whitened[0], 0))
             for w in whitened[1:]]
    loss, terms = intl.multi_view_intl_loss([torch.from_numpy(z) for z in zs])
    assert loss.item() == pytest.approx(sum(pairs) / (views - 1), rel=1e-9)
    assert terms["alignment"].item() == pytest.approx(np.mean([2 - 2 * cosine(w, whitened[0]) for w in whitened[1:]]))
    t = iter_norm_numpy(target, 4, 0)
    expected = np.mean([2 - 2 * cosine(w, t) + beta * trace_loss_numpy(w, 0) for w in whitened])
    loss, _ = intl.multi_view_intl_loss([torch.from_numpy(z) for z in zs], z_target=torch.from_numpy(target))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    two = [torch.from_numpy(z) for z in zs[:2]]
    assert intl.multi_view_intl_loss(two)[0].item() == pytest.approx(intl.intl_loss(*two)[0].item(), rel=1e-12)
    online = [torch.from_numpy(z).requires_grad_() for z in zs]  # the target gets no gradient, the online views do
    z_target = torch.from_numpy(target).requires_grad_()
    intl.multi_view_intl_loss(online, z_target=z_target.detach())[0].backward()
    assert all(z.grad.abs().sum() > 0 for z in online) and z_target.grad is None


def test_the_ema_momentum_rises_from_its_base_to_one_and_the_update_interpolates():
    """main.py: m = 1 - 0.5 (1 + cos(pi k / K)) (1 - cfg.m), k counting optimiser steps."""
    assert intl.ema_momentum(0, 1000, 0.996) == pytest.approx(0.996)
    assert intl.ema_momentum(500, 1000, 0.996) == pytest.approx(0.998)
    assert intl.ema_momentum(1000, 1000, 0.996) == pytest.approx(1.0)
    assert intl.ema_momentum(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    intl.ema_update(target, online, 0.75)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t.detach(), 0.75 * b + 0.25 * o.detach())


def multi_crop_folder(tmp_path):
    return write_image_folder(str(tmp_path / "data64"), classes=2, train_per_class=16, test_per_class=4, size=64)


def test_a_multi_crop_ema_step_backpropagates_the_mean_over_the_online_crops_against_the_whitened_target(
        tmp_path, monkeypatch):
    """--augmentations multicrop at 64 px: 6 crops of 64, 64, 55, 46, 37 and 27 px (the authors' 224, 192, ... scaled);
    with --ema view 0 goes through the target only, the five others through the online network."""
    monkeypatch.chdir(tmp_path)
    argv = folder_run(multi_crop_folder(tmp_path), "--epochs", "1", "--batch-size", "16", "--augmentations",
                      "multicrop", "--ema", "--proj-hidden-dim", "32", "--proj-dim", "24")
    step = first_training_step(intl, argv)
    model, (views, labels) = step.model, step.batch
    assert [tuple(x.shape[-2:]) for x in views] == [(64, 64), (64, 64), (55, 55), (46, 46), (37, 37), (27, 27)]
    with torch.no_grad():
        hs = [model["backbone"](x) for x in views[1:]]
        zs = [model["projector"](h).double().numpy() for h in hs]
        target = model["target"]["projector"](model["target"]["backbone"](views[0])).double().numpy()
    t = iter_norm_numpy(target, 4, 0)
    beta = 0.01 * (math.log2(16) - 3)
    cosine = lambda a, b: np.mean(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))  # noqa
    whitened = [iter_norm_numpy(z, 4, 0) for z in zs]
    intl_term = np.mean([2 - 2 * cosine(w, t) + beta * trace_loss_numpy(w, 0) for w in whitened])
    expected = intl_term + probe_loss_numpy(model["online_probe"], (hs[0], hs[1]), labels)
    assert step.loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ema", [False, True])
def test_multi_crop_runs_end_to_end_with_either_pairing_and_the_target_moves_by_ema_only(tmp_path, ema):
    data = multi_crop_folder(tmp_path)
    flags = ["--batch-size", "16", "--augmentations", "multicrop", "--run-name", "multi"] + ["--ema"] * ema
    result = run_script("intl.py", *folder_run(data, *flags), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if beside("tensor_pipeline"):  # auto: the tensor pipeline makes two views of one size, and says so
        assert "--augmentations multicrop asks for 6 views; the tensor pipeline makes two of one size" in result.stdout
    records = [json.loads(line) for line in open(tmp_path / "runs" / "multi" / "metrics.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in train)
    assert [r.get("ema_m") is not None for r in train] == [ema] * 4
    if ema:
        assert [r["ema_m"] for r in train] == pytest.approx([intl.ema_momentum(k, 4, 0.996) for k in range(4)])
        model = torch.load(tmp_path / "runs" / "multi" / "checkpoint.pt", weights_only=True)["model"]
        assert {k for k in model if k.startswith("target.")} == \
            {"target." + k for k in model if k.startswith(("backbone.", "projector."))}
        assert not torch.equal(model["target.backbone.0.weight"], model["backbone.0.weight"])


def test_a_multi_crop_ema_run_stopped_by_a_signal_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch,
                                                                                        tiny_folder):
    check_signal_resume(intl, tmp_path, monkeypatch, tiny_folder, "pil", "0", "none", "SIGINT", "--augmentations",
                        "multicrop", "--ema")
