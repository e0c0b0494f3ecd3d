"""distributed.py (optional): torchrun with N processes takes the steps of one process: the same losses,
gradients, data and weights (2 CPU processes with gloo against one)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn as nn

import common
from conftest import HERE, METHOD_NAMES, assert_records_close, method_module

pytest.importorskip("distributed", reason="distributed.py is not beside common.py")
pytest.importorskip("synthetic", reason="synthetic.py is not beside common.py")
simclr, byol, vicreg, intl = (method_module(name) for name in METHOD_NAMES)
METHODS = {"simclr": simclr, "byol": byol, "vicreg": vicreg, "intl": intl}


WORLD = 2  # CPU processes with gloo


DISTRIBUTED_CASES = ("simclr", "vicreg", "intl axis 0", "intl axis 1", "intl multi-crop ema", "byol", "online probe",
                     "batchnorm")


def distributed_case(name, rank=0, world_size=1):
    """(loss, local inputs, parameters, buffers) of a case on process rank's slice of a fixed float64 batch of 16
    (world_size 1: the whole batch), computed as a training step computes it."""
    g = torch.Generator().manual_seed(0)

    def local(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).chunk(world_size)[rank].clone().requires_grad_()

    z1, z2 = local(16, 12), local(16, 12)
    if name == "simclr":
        return simclr.nt_xent_loss(z1, z2, 0.2), [z1, z2], [], []
    if name == "vicreg":
        return vicreg.vicreg_loss(z1, z2)[0], [z1, z2], [], []
    if name == "intl multi-crop ema":  # three online views against the whitened target, all of the global batch
        z3, target = local(16, 12), local(16, 12).detach()
        return intl.multi_view_intl_loss([z1, z2, z3], z_target=target)[0], [z1, z2, z3], [], []
    if name.startswith("intl"):
        return intl.intl_loss(z1, z2, 4, int(name[-1]))[0], [z1, z2], [], []
    if name == "byol":
        return byol.byol_loss(z1, z2), [z1], [], []
    if name == "online probe":  # more unlabelled images in one process than in the other
        labels = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0, -1, -1, -1, -1, 2, 1, 0, 2]).chunk(world_size)[rank]
        probe = nn.Linear(12, 3)  # fp32: the probe takes float features
        with torch.no_grad():
            probe.weight.copy_(torch.randn(3, 12, generator=g)), probe.bias.copy_(torch.randn(3, generator=g))
        return common.online_probe_loss(probe, (z1, z2), labels), [], list(probe.parameters()), []
    images, head = local(16, 3, 4, 4), local(16, 3, 4, 4).detach()
    bn = nn.BatchNorm2d(3).double()
    bn = common.sync_batch_norm(nn.Sequential(bn))[0] if world_size > 1 else bn
    loss = (bn(images) * head).sum() / len(images)  # a mean over this process's images, like BYOL's loss
    return loss, [images], list(bn.parameters()), [bn.running_mean, bn.running_var]


def distributed_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for name in DISTRIBUTED_CASES:
        loss, inputs, params, buffers = distributed_case(name, rank, world_size)
        loss.backward()
        results[name] = (loss.detach(), [x.grad for x in inputs], [p.grad for p in params], buffers)
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every case computed by 2 gloo processes, each on its half of the batch (one spawn for all)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path_factory.mktemp("ranks"))
    torch.multiprocessing.spawn(distributed_worker, args=(WORLD, port, out), nprocs=WORLD)
    return [torch.load(os.path.join(out, f"{rank}.pt"), weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("name", DISTRIBUTED_CASES)
def test_gathered_losses_on_two_processes_equal_one_process_and_so_do_the_gradients(two_processes, name):
    """The step of N processes is that of one: gradients are averaged over the processes (optimizer_step), so
    each process's gradient of its own embeddings, divided by N, must be one process's gradient of them, and
    the loss, averaged over processes (as logged), one process's loss. SimCLR, VICReg's variance and
    covariance, INTL and the probe see the global batch through common.gather; BYOL's and VICReg's
    invariance are local means; BatchNorm has the global batch's statistics (running ones included)."""
    loss, inputs, params, buffers = distributed_case(name)
    loss.backward()
    ranks = [result[name] for result in two_processes]
    tolerance = 1e-6 if name == "online probe" else 1e-10  # float32 there, float64 elsewhere
    assert sum(r[0] for r in ranks).item() / WORLD == pytest.approx(loss.item(), rel=tolerance, abs=1e-12)
    for i, x in enumerate(inputs):
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r[1][i] / WORLD, x.grad.chunk(WORLD)[rank], rtol=0, atol=tolerance)
    for i, p in enumerate(params):  # what the averaged step sees
        torch.testing.assert_close(sum(r[2][i] for r in ranks) / WORLD, p.grad, rtol=0, atol=tolerance)
    for i, b in enumerate(buffers):
        assert all(torch.allclose(r[3][i], b, rtol=0, atol=1e-12) for r in ranks)
    if name in ("simclr", "intl axis 0", "intl multi-crop ema", "online probe"):  # the global batch's: the same
        assert all(r[0].item() == pytest.approx(loss.item(), rel=tolerance) for r in ranks)


def test_local_gradient_without_the_gather_would_be_wrong():
    """What the test above guards against: NT-Xent over local negatives only is another loss."""
    loss, _, _, _ = distributed_case("simclr")
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(16, 12, generator=g, dtype=torch.float64) for _ in range(2))
    local = sum(simclr.nt_xent_loss(a, b, 0.2) for a, b in zip(z1.chunk(WORLD), z2.chunk(WORLD))) / WORLD
    assert abs(local.item() - loss.item()) > 0.1


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_each_process_gets_its_slice_of_the_global_batch_with_one_process_views(pipeline):
    """Process k of N gets exactly the images, labels and views one process gives the k-th slice of every
    global batch, epoch after epoch (the draws are made for the whole batch, or seeded per image)."""
    args = SimpleNamespace(dataset="synthetic", data_dir="unused", eval_data_dir=None, synthetic_size=96,
                           image_size=None, augmentations="vicreg", batch_size=32, seed=3, device="cpu",
                           num_workers=0, pipeline=pipeline, skip_bad_images=False, overlap=False, blur_p=None)
    loaders = [common.build_data(args, rank, world_size).train_loader for rank, world_size in ((0, 1), (0, 2), (1, 2))]
    assert [len(loader) for loader in loaders] == [3, 3, 3]
    for epoch in (0, 1):
        for loader in loaders:
            common.set_data_epoch(loader, args.seed, epoch)
        for ((a1, a2), la), ((b1, b2), lb), ((c1, c2), lc) in zip(*loaders):
            assert b1.shape[0] == c1.shape[0] == 16 and torch.equal(la, torch.cat([lb, lc]))
            assert torch.equal(a1, torch.cat([b1, c1])) and torch.equal(a2, torch.cat([b2, c2]))


def test_a_batch_that_does_not_divide_among_the_processes_is_one_line_per_machine(monkeypatch, capsys):
    """As torchrun's environment says; checked before joining the process group. Other local ranks are silent."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local_rank, expected in (("0", "error: --batch-size 63 is the global batch and must divide among the 2 "
                                       "processes\n"), ("1", "")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as exit_info:
            common.start_processes("cpu", 63)
        assert exit_info.value.code == 2 and capsys.readouterr().err == expected


# Two optimiser steps of every method, both pipelines: torchrun with 2 processes against one process. (With
# --ortho srip --ortho-weight 0.01 --ortho-heads VICReg's tensor run moved by 1.3e-4: a ReLU input within float
# noise of 0 flips, as diagnosed once on one BatchNorm channel; these flags stay below 5e-5.)


TWO_STEPS = ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "64", "--epochs", "1",
             "--warmup-epochs", "0", "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--arch", "convnet"]


def torchrun(script, *argv, cwd, processes=WORLD):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), os.path.join(HERE, script), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def compare_runs(tmp_path, monkeypatch, capsys, method, argv):
    """Run METHOD.py's main here as one process (one thread, as each torchrun process) and under torchrun
    with 2; returns (max weight difference over every parameter and buffer, the two runs' train records,
    the two stdouts)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        METHODS[method].main(METHODS[method].parse_args(argv + ["--run-name", "one"]))
    finally:
        torch.set_num_threads(threads)
    out_one = capsys.readouterr().out
    two = torchrun(f"{method}.py", *argv, "--run-name", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    states = [torch.load(tmp_path / "runs" / name / "checkpoint.pt", weights_only=True) for name in ("one", "two")]
    assert [s["args"]["world_size"] for s in states] == [1, 2]
    assert [json.load(open(tmp_path / "runs" / name / "args.json"))["world_size"] for name in ("one", "two")] == [1, 2]
    assert states[0]["model"].keys() == states[1]["model"].keys()
    diff = max((states[0]["model"][k].double() - states[1]["model"][k].double()).abs().max().item()
               for k in states[0]["model"])
    records = [[json.loads(line) for line in open(tmp_path / "runs" / name / "metrics.jsonl") if '"train"' in line]
               for name in ("one", "two")]
    return diff, records, (out_one, two.stdout)


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
@pytest.mark.parametrize("method", ["simclr", "byol", "vicreg", "intl"])
def test_torchrun_with_two_processes_ends_with_the_weights_of_one_process(tmp_path, monkeypatch, capsys, method,
                                                                          pipeline):
    """Weights, BatchNorm buffers (SyncBatchNorm in backbone, heads and BYOL's target), the online probe and
    every logged term after two steps. Summation order alone moves them by up to ~4e-5 here; a wrong gradient
    scale, local negatives or per-process BatchNorm by far more."""
    diff, (one, two), (out_one, out_two) = compare_runs(tmp_path, monkeypatch, capsys, method,
                                                        TWO_STEPS + ["--pipeline", pipeline])
    with capsys.disabled():
        print(f" {method} {pipeline}: max weight difference {diff:.1e}, loss difference "
              f"{max(abs(a['loss'] - b['loss']) for a, b in zip(one, two)):.1e}", end=" ")
    assert diff <= 1e-4
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):  # numbers within float noise, strings ("type": "train") and keys exactly
        assert_records_close({k: v for k, v in a.items() if k != "images_per_s"},
                             {k: v for k, v in b.items() if k != "images_per_s"}, rel=1e-4, abs=1e-5)
    assert out_one.splitlines()[0].startswith("1 process trains")
    assert out_two.splitlines()[0].startswith("2 processes train (gloo")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol", "vicreg", "intl"])
def test_torchrun_keeps_the_loss_curve_of_one_process(tmp_path, monkeypatch, capsys, method):
    """Three epochs of 8 steps: the loss curves of 1 and 2 processes agree within 0.5% at every step. Summation
    order moves a step by ~1e-7; the steps amplify it (at VICReg's recipe lr, 0.3 with LARS, to 6% by step 10
    under torch 2.15, from 1e-6 at step 4: float noise, the two-step test above bounds the gather itself), so
    the lr here is 0.05, where the measured largest step difference was 1e-3 (VICReg)."""
    argv = ["--dataset", "synthetic", "--synthetic-size", "512", "--batch-size", "64", "--epochs", "3",
            "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--arch", "convnet", "--base-lr", "0.05"]
    diff, (one, two), _ = compare_runs(tmp_path, monkeypatch, capsys, method, argv)
    losses = [[r["loss"] for r in records] for records in (one, two)]
    with capsys.disabled():
        print(f" {method}: max weight difference {diff:.2e}, max loss difference "
              f"{max(abs(a - b) for a, b in zip(*losses)):.2e}", end=" ")
    assert len(losses[0]) == len(losses[1]) == 24
    assert losses[1] == pytest.approx(losses[0], rel=5e-3)


@pytest.mark.slow
def test_resume_under_torchrun_with_another_number_of_processes(tmp_path, monkeypatch):
    """A run checkpointed by one process after its first epoch, resumed by torchrun with 2, ends where the
    uninterrupted single-process run does (the draws and the steps do not depend on N)."""
    monkeypatch.chdir(tmp_path)
    argv = TWO_STEPS + ["--epochs", "2", "--pipeline", "pil"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simclr.main(simclr.parse_args(argv + ["--run-name", "straight"]))
        end_of_epoch = common.Run.end_of_epoch  # the first epoch's end, then an error that stops the run there
        with mock.patch.object(common.Run, "end_of_epoch", lambda run, *a: (end_of_epoch(run, *a), 1 / 0)), \
                pytest.raises(ZeroDivisionError):
            simclr.main(simclr.parse_args(argv + ["--run-name", "resumed"]))
    finally:
        torch.set_num_threads(threads)
    result = torchrun("simclr.py", "--resume", "runs/resumed/checkpoint.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    straight, resumed = (torch.load(f"runs/{name}/checkpoint.pt", weights_only=True)
                         for name in ("straight", "resumed"))
    assert (resumed["epoch"], resumed["args"]["world_size"], straight["args"]["world_size"]) == (2, 2, 1)
    assert max((straight["model"][k].double() - resumed["model"][k].double()).abs().max().item()
               for k in straight["model"]) <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_process_that_dies_ends_the_run_with_one_line_on_rank_0(tmp_path):
    import signal
    import time
    argv = ["--dataset", "synthetic", "--synthetic-size", "2048", "--batch-size", "64", "--epochs", "3",
            "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--arch", "convnet"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", os.path.join(HERE, "simclr.py"), *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while "step 2/" not in launcher.stdout.readline():
        assert launcher.poll() is None
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        if "RANK=1" in open(f"/proc/{pid}/environ").read().split("\0"):
            os.kill(int(pid), signal.SIGKILL)
    started = time.time()
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.time() - started < 60
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: the run stops here: another process died or stopped answering, or torchrun was stopped (its report "
        "below says which)"]
