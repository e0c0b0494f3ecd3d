"""Shared test helpers and fixtures. Copied with a method file, its test file and common.py, it is all those
tests need: a test of an optional module (tensor_pipeline.py, synthetic.py, distributed.py, another script)
skips, saying which file is missing."""
import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
METHOD_NAMES = ("simclr", "byol", "vicreg", "intl")


def run_script(*argv, cwd, env=None):
    """Run a project script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def beside(name):
    """Whether the optional module `name`.py is beside common.py."""
    return importlib.util.find_spec(name) is not None


def method_module(name):
    """The module `name` (a method file or an optional one), or the test skips saying it is absent."""
    return pytest.importorskip(name, reason=f"{name}.py is not beside common.py")


# 256 generated images, 4 steps of 64 an epoch: needs synthetic.py
TINY_RUN = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "64", "--epochs", "2",
            "--warmup-epochs", "1", "--num-workers", "0", "--log-every", "1", "--device", "cpu"]


def write_image_folder(root, classes=4, train_per_class=32, test_per_class=8, size=32, seed=0):
    """root/train/<class>/*.png and root/test/<class>/*.png: noise around a colour of the class, so that a
    kNN on a trained backbone has something to find. Returns root."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(96, 160, (classes, 3))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(count):
                pixels = np.clip(colours[c] + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{c}", f"{i}.png"))
    return root


def write_unlabelled_tree(root, count=64, size=32, seed=1):
    """count images at depths 0 to 3 under root (root/*.png, root/a1/*.jpg, root/a1/b0/c1/*.png...), no class
    folders, and a file that is not an image (notes.txt). Returns the images' paths, sorted as os.walk would list
    them (torchvision's order)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = os.path.join(root, *[f"{'abc'[level]}{(i >> level) % 2}" for level in range(i % 4)])
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"{i:03d}.{'png' if i % 3 else 'jpg'}"))
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1], quality=95)
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    return sorted(paths, key=lambda path: (os.path.dirname(path), os.path.basename(path)))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 4-class ImageFolder tree of 128 training and 32 test images, 32 px."""
    return write_image_folder(str(tmp_path_factory.mktemp("tiny") / "data"))


def folder_run(data_dir, *extra):
    """Flags of a tiny run on an image folder (nothing beyond common.py needed): the convnet, 2 epochs of
    4 steps of 32, a 1-epoch warm-up, a line every step."""
    return ["--dataset", "folder", "--data-dir", str(data_dir), "--arch", "convnet", "--batch-size", "32",
            "--epochs", "2", "--warmup-epochs", "1", "--num-workers", "0", "--log-every", "1", "--device", "cpu",
            *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_folder):
    """tiny_run(method): METHOD.py run once per session as a subprocess on tiny_folder (folder_run); returns
    the run folder, the CompletedProcess and the metrics.jsonl records."""
    done = {}

    def run(method):
        if method not in done:
            cwd = tmp_path_factory.mktemp(method)
            result = run_script(f"{method}.py", *folder_run(tiny_folder), "--run-name", "tiny", cwd=cwd)
            assert result.returncode == 0, result.stderr
            run_dir = cwd / "runs" / "tiny"
            done[method] = SimpleNamespace(run_dir=run_dir, result=result, cwd=cwd,
                                           records=[json.loads(line) for line in open(run_dir / "metrics.jsonl")])
        return done[method]
    return run


def check_end_to_end(run, base_lr, logged_terms):
    """What every method's tiny_run must show: the run folder's files, 8 logged steps with finite loss terms,
    the warm-up and peak lr (base lr x 32 / 256), evaluations at epochs 0 (untrained), 1 and 2 with the
    linear probe last, what --pipeline auto chose stored, and the before/after line."""
    files = sorted(os.listdir(run.run_dir))
    events = [name for name in files if name.startswith("events.out.tfevents.")]  # TensorBoard's, when installed
    assert [name for name in files if name not in events] == ["args.json", "backbone.pt", "checkpoint.pt",
                                                               "metrics.jsonl"], files
    assert len(events) == beside("tensorboard"), files
    train = [r for r in run.records if r["type"] == "train"]
    evals = [r for r in run.records if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))             # 128 // 32 = 4 steps x 2 epochs
    assert all({"loss", "lr", "images_per_s", "probe", *logged_terms} <= set(r) for r in train)
    assert all(math.isfinite(r[k]) for r in train for k in ("loss", "probe", *logged_terms))
    assert train[0]["lr"] == pytest.approx(base_lr * 32 / 256 / 4)      # warm-up: a quarter of the peak
    assert train[3]["lr"] == pytest.approx(base_lr * 32 / 256)          # the peak: base lr x batch / 256
    assert [r["epoch"] for r in evals] == [0, 1, 2] and 0 <= evals[-1]["knn_top1"] <= 100
    assert "linear_top1" in evals[-1] and "linear_top1" not in evals[0] and evals[-1]["proj_erank"] >= 1
    assert {"online_top1", "knn5_top1", "knn5_euclidean_top1", "rep_erank", "rep_std"} <= set(evals[-1])
    stored = json.load(open(run.run_dir / "args.json"))
    assert stored["pipeline"] == ("tensor" if beside("tensor_pipeline") else "pil")
    assert f"kNN top-1 (weighted, k=200, clean test images): {evals[0]['knn_top1']:.1f}% untrained -> " \
           f"{evals[-1]['knn_top1']:.1f}%" in run.result.stdout
    return train, evals


def first_training_step(module, argv):
    """Runs module.main(parse_args(argv)) here and returns what its first optimiser step saw: the loss it
    back-propagated (a float), a copy of the model just before that step, in train mode, and the batch
    ((x1, x2), labels). The hand computations of the method tests start from these."""
    seen = {}
    real_build, real_step, real_batches = module.build_optimizer, module.optimizer_step, module.epoch_batches

    def build_optimizer(name, model, *args, **kwargs):
        seen["model"] = model
        return real_build(name, model, *args, **kwargs)

    def optimizer_step(loss, optimizer, scaler):
        if "loss" not in seen:
            seen["loss"], seen["before"] = loss.item(), copy.deepcopy(seen["model"])
        real_step(loss, optimizer, scaler)

    def epoch_batches(*args):
        for batch in real_batches(*args):
            seen.setdefault("batch", batch)
            yield batch

    with mock.patch.object(module, "build_optimizer", build_optimizer), \
            mock.patch.object(module, "optimizer_step", optimizer_step), \
            mock.patch.object(module, "epoch_batches", epoch_batches):
        module.main(module.parse_args(argv))
    return SimpleNamespace(loss=seen["loss"], model=seen["before"], batch=seen["batch"])


def probe_loss_numpy(probe, features, labels):
    """The online probe's loss restated: cross-entropy of probe(h) over the labelled images, each view, averaged."""
    weight, bias = probe.weight.detach().double().numpy(), probe.bias.detach().double().numpy()
    keep = labels.numpy() >= 0
    losses = []
    for h in features:
        logits = h.detach().double().numpy()[keep] @ weight.T + bias
        logits = logits - logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        losses.append(-log_p[np.arange(keep.sum()), labels.numpy()[keep]].mean())
    return float(np.mean(losses))


def so_numpy(weights):
    """Soft orthogonality restated: sum over weights of ||G - I||_F^2, G on the smaller side of W (out x fan_in)."""
    total = 0.0
    for w in weights:
        w = w.detach().double().numpy().reshape(w.shape[0], -1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        total += ((gram - np.eye(len(gram))) ** 2).sum()
    return total


def conv_and_linear_weights(module):
    return [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def probe_and_penalty_numpy(model, features, labels, ortho_weight):
    """What every method's training step adds to its own loss, restated: the online probe's loss on the features
    of both views, and ortho_weight times soft orthogonality of the backbone's conv and linear weights."""
    return (probe_loss_numpy(model["online_probe"], features, labels)
            + ortho_weight * so_numpy(conv_and_linear_weights(model["backbone"])))


@torch.no_grad()
def two_view_outputs(model, x1, x2):
    """((h1, h2), (z1, z2)): the backbone's representations and the projector's outputs of both views."""
    h1, h2 = model["backbone"](x1), model["backbone"](x2)
    return (h1, h2), (model["projector"](h1), model["projector"](h2))


def signal_after(step_function, steps, *signals):
    """A wrapper of a method's optimizer_step that sends this process `signals` (names) after its call number
    `steps`: how the tests stop a run mid-epoch at a known step, from outside the training loop."""
    calls = [0]

    def optimizer_step(*args):
        step_function(*args)
        calls[0] += 1
        if calls[0] == steps:
            for name in signals:
                os.kill(os.getpid(), getattr(signal, name))
    return optimizer_step


# METHOD.py in a subprocess with signal_after wrapped around its optimizer_step: argv[1] steps, argv[2] the
# signals, then the script's own flags
SIGNALLED_RUN = """
import sys
sys.path[:0] = [{here!r}]
import conftest, {method} as module
module.optimizer_step = conftest.signal_after(module.optimizer_step, int(sys.argv[1]), *sys.argv[2].split())
module.main(module.parse_args(sys.argv[3:]))
"""


def run_signalled(method, steps, signals, argv, cwd):
    """Run METHOD.py's main as a user would, sent `signals` (e.g. "SIGTERM", or "SIGINT SIGINT") after `steps`
    optimiser steps of this process; returns the CompletedProcess."""
    code = SIGNALLED_RUN.format(here=HERE, method=method)
    return subprocess.run([sys.executable, "-c", code, str(steps), signals, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def check_signal_resume(module, tmp_path, monkeypatch, data_dir, pipeline, workers, ortho, signame, *extra):
    """SIGINT or SIGTERM sent to a training subprocess after step 6 of 8 (epoch 2 of 2): it finishes the step,
    writes a checkpoint at step 6 and exits 130 / 143; --resume then ends with the weights, BN buffers, BYOL's
    target, SRIP's power-iteration vectors and optimiser state of an uninterrupted run. Returns the
    uninterrupted run's checkpoint path."""
    if pipeline == "tensor" and not beside("tensor_pipeline"):
        pytest.skip("tensor_pipeline.py is not beside common.py")
    monkeypatch.chdir(tmp_path)
    method = module.METHOD
    argv = folder_run(data_dir, "--num-workers", workers, "--ortho", ortho, "--ortho-heads", "--pipeline", pipeline,
                      *extra)
    module.main(module.parse_args(argv + ["--run-name", "straight"]))
    result = run_signalled(method, 6, signame, argv + ["--run-name", "interrupted"], cwd=tmp_path)
    assert result.returncode == 128 + getattr(signal, signame), result.stderr
    assert result.stderr.strip() == (f"error: stopped by {signame}; continue from the checkpoint (epoch 1, step 6) "
                                     f"with `python {method}.py --resume runs/interrupted/checkpoint.pt`")
    stopped = torch.load("runs/interrupted/checkpoint.pt", weights_only=True)
    assert (stopped["epoch"], stopped["global_step"]) == (1, 6)
    module.main(module.parse_args(["--resume", "runs/interrupted/checkpoint.pt", "--num-workers", workers]))
    straight = torch.load("runs/straight/checkpoint.pt", weights_only=True)
    resumed = torch.load("runs/interrupted/checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2 and resumed["global_step"] == 8
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    steps = [r["step"] for r in map(json.loads, open("runs/interrupted/metrics.jsonl")) if r["type"] == "train"]
    assert steps == list(range(1, 9))  # each step logged once, the resumed ones after the others
    srip_vectors = sum(key.startswith("ortho.srip_vectors_") for key in straight["model"])
    assert srip_vectors == (6 if ortho == "srip" else 0)  # 4 conv shapes + 2 head shapes
    return tmp_path / "runs" / "straight" / "checkpoint.pt"


def check_learns_offline(method, tmp_path):
    """The README's offline command (`python METHOD.py --dataset synthetic`): weighted kNN at least 15 points
    above the random-init backbone's (eval_linear.py --random-init)."""
    method_module("synthetic"), method_module("eval_linear")
    result = run_script(f"{method}.py", "--dataset", "synthetic", "--run-name", "learn", "--eval-every", "1000",
                        "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    final = [json.loads(line) for line in open(tmp_path / "runs/learn/metrics.jsonl")][-1]
    result = run_script("eval_linear.py", "--checkpoint", "runs/learn/checkpoint.pt", "--random-init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    baseline = json.load(open(tmp_path / "runs/learn/linear_eval_random_init.json"))
    assert final["knn_top1"] > baseline["knn_top1"] + 15, (final, baseline)


def assert_records_close(a, b, rel=1e-4, abs=1e-5):
    """Two logged records agree: the same keys, strings and flags exactly, numbers within the tolerance."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert b[key] == pytest.approx(value, rel=rel, abs=abs), key
        else:
            assert b[key] == value, key


def separable_features(n_per_class=40, num_classes=4, dim=8, seed=0):
    """Clusters around orthogonal directions: linearly and kNN separable."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:num_classes] * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer checks (minutes on a CPU); run with `pytest -q -m slow`")
