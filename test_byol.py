"""BYOL (byol.py): the loss, the EMA target and its schedule against hand computations, the recipe pinned to its
source, the training step (two directions averaged) against a hand computation, and the script end to end."""
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn

import byol
from conftest import (check_end_to_end, check_learns_offline, check_signal_resume, first_training_step, folder_run,
                      probe_and_penalty_numpy)


def byol_numpy(p, z):
    """2 - 2 cos(p_i, z_i), one sample at a time, averaged."""
    return float(
        np.mean([2 - 2 * (p[i] @ z[i]) / (np.linalg.norm(p[i]) * np.linalg.norm(z[i])) for i in range(len(p))])
    )


@pytest.mark.parametrize("n,d", [(1, 2), (8, 16), (64, 256)])
def test_byol_loss_matches_numpy(n, d):
    rng = np.random.default_rng(n + d)
    p, z = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    loss = byol.byol_loss(torch.from_numpy(p), torch.from_numpy(z))
    assert loss.shape == () and loss.item() == pytest.approx(byol_numpy(p, z), rel=1e-12)


def test_byol_loss_analytic_values_and_stop_gradient():
    z = torch.randn(10, 32, dtype=torch.float64)
    scales = torch.rand(10, 1, dtype=torch.float64) + 0.1
    assert byol.byol_loss(z * scales, z).item() == pytest.approx(0.0, abs=1e-12)   # p parallel to z
    assert byol.byol_loss(-z * scales, z).item() == pytest.approx(4.0, abs=1e-12)  # p = -z
    q = torch.randn(10, 32, dtype=torch.float64)                                    # orthogonal to z
    q = q - (q * z).sum(1, keepdim=True) / (z * z).sum(1, keepdim=True) * z
    assert byol.byol_loss(q, z).item() == pytest.approx(2.0, abs=1e-12)
    p, z = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    byol.byol_loss(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0                                # gradient reaches p only


def test_ema_update_copies_at_tau_0_freezes_at_tau_1_and_interpolates_between():
    online, target = nn.Linear(5, 3), nn.Linear(5, 3)
    online_params = [p.detach().clone() for p in online.parameters()]
    start = [p.detach().clone() for p in target.parameters()]
    byol.ema_update(target, online, 1.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), start))
    byol.ema_update(target, online, 0.9)
    for t, s, o in zip(target.parameters(), start, online_params):
        torch.testing.assert_close(t.detach(), 0.9 * s + 0.1 * o, rtol=0, atol=1e-7)
    byol.ema_update(target, online, 0.0)
    assert all(torch.equal(t, o) for t, o in zip(target.parameters(), online_params))


def test_the_ema_rate_tau_follows_the_cosine_from_tau_base_to_one():
    assert byol.ema_momentum(0, 1000, 0.99) == pytest.approx(0.99)
    assert byol.ema_momentum(500, 1000, 0.99) == pytest.approx(0.995)
    assert byol.ema_momentum(1000, 1000, 0.99) == pytest.approx(1.0)
    taus = [byol.ema_momentum(k, 100, 0.996) for k in range(101)]
    assert all(a < b for a, b in zip(taus, taus[1:]))


def test_the_offline_check_has_its_own_recipe_and_flags_still_win():
    args = byol.parse_args(["--dataset", "synthetic"])
    assert (args.optimizer, args.base_lr, args.weight_decay, args.epochs, args.warmup_epochs, args.eval_every) == \
        ("sgd", 0.05, 5e-4, 80, 8, 8)
    assert args.augmentations == "asymmetric" and args.tau_base == 0.99 and args.blur_p is None
    # flags equal to the CIFAR defaults are still flags: this is the earlier offline default
    args = byol.parse_args(["--dataset", "synthetic", "--optimizer", "lars", "--base-lr", "1.0",
                            "--weight-decay", "1e-5", "--epochs", "40"])
    assert (args.optimizer, args.base_lr, args.weight_decay, args.epochs, args.warmup_epochs) == \
        ("lars", 1.0, 1e-5, 40, 4)
    assert byol.parse_args(["--dataset", "synthetic", "--base-lr", "0.1"]).optimizer == "sgd"
    args = byol.parse_args(["--dataset", "cifar10"])  # the reference recipe everywhere else
    assert (args.optimizer, args.base_lr, args.weight_decay, args.epochs, args.warmup_epochs) == \
        ("lars", 1.0, 1e-5, 1000, 10)


# ----------------------------------------------------------------------------------------------
# The recipe, the training step and the script
# ----------------------------------------------------------------------------------------------
# solo-learn fca55e3 (the commit that posted 92.58): bash_files/pretrain/cifar/byol.sh, solo/methods/base.py
PINNED_RECIPE = dict(epochs=1000, batch_size=256, optimizer="lars", base_lr=1.0, weight_decay=1e-5,  # byol.sh
                     warmup_epochs=10, final_lr_ratio=0.0, augmentations="asymmetric", probe_lr=0.1,
                     blur_p=None, tau_base=0.99, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096)


def test_the_recipe_is_pinned_to_its_source():
    args = byol.parse_args(["--dataset", "cifar10", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_RECIPE} == PINNED_RECIPE


# solo-learn fca55e3 bash_files/pretrain/imagenet-100/byol.sh (batch 128 x 2 GPUs), solo/args defaults
PINNED_IMAGENET100 = dict(dataset="folder", arch="resnet18", epochs=400, batch_size=256, optimizer="lars", base_lr=1.0,
                          weight_decay=1e-5, warmup_epochs=10, final_lr_ratio=0.0, augmentations="asymmetric",
                          probe_lr=0.1, tau_base=0.99, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=8192)


def test_the_imagenet100_recipe_is_pinned_to_its_source():
    """At 224 px the recipe's views are solo-learn's ImageNet-100 ones too (blur and solarisation by view)."""
    args = byol.parse_args(["--recipe", "imagenet100", "--data-dir", "IN100", "--device", "cpu"])
    assert {name: getattr(args, name) for name in PINNED_IMAGENET100} == PINNED_IMAGENET100


def test_the_training_step_averages_the_two_directions_and_adds_the_probe_and_the_weighted_penalty(
        tmp_path, monkeypatch, tiny_folder):
    """Each view's prediction regresses the other view's target projection; the two directions averaged
    (solo-learn fca55e3), not summed: a sum would double the BYOL term against the probe and the penalty."""
    monkeypatch.chdir(tmp_path)
    argv = folder_run(tiny_folder, "--epochs", "1", "--ortho", "so", "--ortho-weight", "0.01")
    step = first_training_step(byol, argv)
    model, ((x1, x2), labels) = step.model, step.batch
    with torch.no_grad():
        h1, h2 = model["backbone"](x1), model["backbone"](x2)
        p1, p2 = (model["predictor"](model["projector"](h)) for h in (h1, h2))
        target_z1, target_z2 = (model["target"]["projector"](model["target"]["backbone"](x)) for x in (x1, x2))
    as_numpy = lambda t: t.double().numpy()  # noqa: E731
    directions = byol_numpy(as_numpy(p1), as_numpy(target_z2)) + byol_numpy(as_numpy(p2), as_numpy(target_z1))
    expected = directions / 2 + probe_and_penalty_numpy(model, (h1, h2), labels, 0.01)
    assert step.loss == pytest.approx(expected, rel=1e-5)


def test_the_script_trains_end_to_end_and_the_target_moves_by_ema_only(tiny_run):
    run = tiny_run("byol")
    train, _ = check_end_to_end(run, PINNED_RECIPE["base_lr"], logged_terms=("tau",))
    assert [r["tau"] for r in train] == pytest.approx([byol.ema_momentum(k, 8, 0.99) for k in range(8)])
    checkpoint = torch.load(run.run_dir / "checkpoint.pt", weights_only=True)
    model = checkpoint["model"]
    online = {k: v for k, v in model.items() if k.startswith(("backbone.", "projector.", "predictor."))}
    target = {k: v for k, v in model.items() if k.startswith("target.")}
    assert set(target) == {"target." + k for k in online if not k.startswith("predictor.")}
    # the optimiser holds momentum for the online network and the online probe only: the target gets none
    trained = ("backbone.", "projector.", "predictor.", "online_probe.")
    trainable = [v for k, v in model.items() if k.startswith(trained) and v.is_floating_point() and "running_" not in k]
    assert len(checkpoint["optimizer"]["state"]) == len(trainable)
    assert not torch.equal(model["target.backbone.0.weight"], model["backbone.0.weight"])  # moved, but not online


def test_a_run_stopped_by_a_signal_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_folder):
    """With SRIP on the heads: its power-iteration vectors resume too. The target moves once per optimiser step,
    after it: 8 steps straight, then the resumed run's steps 7 and 8."""
    with mock.patch.object(byol, "ema_update", wraps=byol.ema_update) as ema:
        check_signal_resume(byol, tmp_path, monkeypatch, tiny_folder, "tensor", "0", "srip", "SIGTERM")
    taus = [byol.ema_momentum(k, 8, 0.99) for k in (*range(8), 6, 7)]
    assert [call.args[2] for call in ema.call_args_list] == pytest.approx(taus)


@pytest.mark.slow
def test_the_offline_check_learns(tmp_path):
    check_learns_offline("byol", tmp_path)
