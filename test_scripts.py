"""The scripts: the method files' shared anatomy and flags, eval_linear.py, spectrum.py, bench.py, reproduce.py,
synthetic.py, smoke.py and gpu_check.sh, the two-file copy and the CI command, each run as a user runs it."""
import argparse
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import HERE, METHOD_NAMES, TINY_RUN, folder_run, method_module, run_script, separable_features


@pytest.fixture
def eval_linear():
    return method_module("eval_linear")


@pytest.fixture
def spectrum():
    return method_module("spectrum")


@pytest.fixture
def synthetic():
    return method_module("synthetic")


# ----------------------------------------------------------------------------------------------
# The method files: one anatomy, every flag with help and a range
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_flag_has_help(method):
    captured = {}

    def capture(self, argv=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        method_module(method).parse_args([])
    actions = [a for a in captured["parser"]._actions if a.dest != "help"]
    assert len(actions) > 20
    assert all(a.help and not a.help.startswith("(default") for a in actions), [a.dest for a in actions if not a.help]


def method_sections(path):
    """{marker line: text up to the next marker} for the '# TRY NOT TO MODIFY' and '# ALGO' markers."""
    sections, marker = {}, None
    for line in open(path):
        if line.strip().startswith(("# TRY NOT TO MODIFY", "# ALGO")):
            marker = line.strip()
            sections.setdefault(marker, "")
        elif marker:
            sections[marker] += line
    return sections


def test_method_files_differ_only_in_the_method():
    """diff simclr.py byol.py shows only the method: every TRY NOT TO MODIFY section is identical.
    The shared flags are not copied into the files at all (add_common_args, add_recipe_args)."""
    reference = method_sections(os.path.join(HERE, "simclr.py"))
    shared = [m for m in reference if m.startswith("# TRY NOT TO MODIFY")]
    assert len(shared) == 5, shared
    for method in ("byol", "vicreg", "intl"):
        sections = method_sections(os.path.join(HERE, f"{method}.py"))
        assert [m for m in sections if m.startswith("# TRY NOT TO MODIFY")] == shared
        for marker in shared:
            assert sections[marker] == reference[marker], (method, marker)
        algo = [m for m in sections if m.startswith("# ALGO")]
        assert {"# ALGO LOGIC: loss", "# ALGO LOGIC: model", "# ALGO LOGIC: training step"} <= set(algo), algo


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_declares_a_full_recipe_and_takes_the_shared_flags_from_common(method):
    """The recipe flags are declared by add_recipe_args with every value given in the method file
    (no hidden default), and the infrastructure flags are exactly add_common_args's."""
    module = method_module(method)
    source = open(os.path.join(HERE, f"{method}.py")).read()
    recipe = ("epochs", "batch_size", "optimizer", "base_lr", "weight_decay", "warmup_epochs", "final_lr_ratio",
              "augmentations", "probe_lr")
    first, *others = module.RECIPES.values()
    assert set(first) == set(recipe) and "add_recipe_args(parser, RECIPES)" in source
    assert "add_argument(\"--dataset\"" not in source and source.count("add_common_args(parser)") == 1
    common_parser = argparse.ArgumentParser()
    common.add_common_args(common_parser)
    shared = {a.dest for a in common_parser._actions} - {"help"}
    parser_dests = set()
    real_parse = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        parser_dests.update(a.dest for a in self._actions)
        return real_parse(self, argv, namespace)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        module.parse_args(["--dataset", "cifar10", "--device", "cpu"])
    assert shared | set(recipe) <= parser_dests
    for other in others:  # every value of every recipe is a flag's (a misspelt one would be silently unused)
        assert set(other) <= parser_dests, set(other) - parser_dests
        name = next(k for k, v in module.RECIPES.items() if v is other)
        args = module.parse_args(["--recipe", name, "--device", "cpu"])
        assert {k: getattr(args, k) for k in other} == other


NOT_NUMBERS = {"data_dir", "eval_data_dir", "out_dir", "run_name", "resume", "device", "checkpoint"}  # checked in use


@pytest.mark.parametrize("script", ["simclr", "byol", "vicreg", "intl", "eval_linear"])
def test_every_flag_is_validated_when_parsed_with_one_line_naming_the_valid_range(script, capsys):
    """The general mechanism: every numeric flag has a common.Bounded type (the rest have choices, are
    switches or are paths and names), and a value out of its range, or not a number, ends in one line."""
    module = method_module(script)
    captured = {}

    def capture(self, argv=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        module.parse_args([])
    base = ["--checkpoint", "x.pt"] if script == "eval_linear" else ["--device", "cpu"]
    for action in captured["parser"]._actions:
        if action.dest == "help" or action.choices or action.nargs == 0:
            continue
        assert isinstance(action.type, common.Bounded) or action.dest in NOT_NUMBERS, action.dest
        if not isinstance(action.type, common.Bounded):
            continue
        bound = action.type
        below = bound.gt if bound.gt is not None else bound.ge - (1 if bound.kind is int else 0.5)
        for bad in [below] + ([bound.le + 1] if bound.le is not None else []) + ["nan"]:
            with pytest.raises(SystemExit) as exit_info:
                module.parse_args([action.option_strings[0], str(bad)] + base)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"argument {action.option_strings[0]}: expected {bound.valid}, got {bad}" in err


def test_bad_input_ends_in_one_line_without_traceback(tmp_path):
    result = run_script("simclr.py", "--dataset", "folder", "--data-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().startswith("error: no image folder")
    (tmp_path / "bad.pt").write_bytes(b"\0" * 10)
    for script in ("simclr.py", "byol.py", "vicreg.py", "intl.py", "eval_linear.py"):
        flag = "--checkpoint" if script == "eval_linear.py" else "--resume"
        result = run_script(script, flag, str(tmp_path / "bad.pt"), cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "corrupt" in result.stderr


def test_a_method_file_and_common_py_copied_alone_train_on_an_image_folder(tmp_path):
    """The copy-two-files promise: without tensor_pipeline.py, synthetic.py and distributed.py beside them, a run
    on an ImageFolder tree trains with the PIL pipeline (saying so in one line), evaluates and saves; the features
    of the missing modules each end in one line that names the file."""
    project, data = tmp_path / "project", tmp_path / "data"
    os.makedirs(project)
    for name in ("vicreg.py", "common.py"):
        shutil.copy(os.path.join(HERE, name), project)
    g = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for label in ("a", "b"):
            os.makedirs(data / split / label)
            for i in range(count):
                Image.fromarray(g.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / split / label / f"{i}.png")
    command = [sys.executable, "vicreg.py", "--dataset", "folder", "--data-dir", str(data), "--arch", "convnet",
               "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--run-name", "copied"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONPATH")}
    result = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "data: tensor_pipeline.py is not beside common.py; using the PIL pipeline" in result.stdout
    assert sorted(os.listdir(project)) == ["common.py", "runs", "vicreg.py"]  # nothing else came from the repo
    run_dir = project / "runs" / "copied"
    evals = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1] and json.load(open(run_dir / "args.json"))["pipeline"] == "pil"
    assert len(torch.load(run_dir / "backbone.pt", weights_only=True)) > 0
    for extra, env_extra, expected in ((["--dataset", "synthetic"], {}, "--dataset synthetic needs synthetic.py"),
                                       ([], {"WORLD_SIZE": "2"}, "torchrun needs distributed.py")):
        result = subprocess.run(command + extra + ["--run-name", "refused"], cwd=project, capture_output=True,
                                text=True, timeout=300, env={**env, **env_extra})
        assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_ci_runs_the_readme_test_command_on_the_newest_allowed_releases():
    readme, ci = open(os.path.join(HERE, "README.md")).read(), open(os.path.join(HERE, ".ci", "run")).read()
    assert "pip install -r requirements.txt && pytest -q" in readme
    lines = ci.splitlines()
    assert "pip install --upgrade -r requirements.txt" in lines and lines[-1] == "pytest -q"
    print_versions = ci[ci.index("python -c"):ci.index("\npytest -q")]
    versions = subprocess.run(["bash", "-c", print_versions], capture_output=True, text=True)
    assert versions.returncode == 0 and versions.stdout.startswith("versions: python "), versions.stderr
    assert all(f"{name} " in versions.stdout for name in ("torch", "torchvision", "numpy", "pytest"))


# ----------------------------------------------------------------------------------------------
# eval_linear.py
# ----------------------------------------------------------------------------------------------


def test_eval_linear_rebuilds_a_run_from_its_checkpoint_or_its_backbone_and_a_random_init_baseline(
        eval_linear, tiny_run, tmp_path):
    run = tiny_run("simclr")
    run_dir = shutil.copytree(run.run_dir, tmp_path / "tiny")  # the session's run folder stays as the run left it
    last = [r for r in run.records if r["type"] == "eval"][-1]
    for name in ("checkpoint.pt", "backbone.pt"):
        result = run_script("eval_linear.py", "--checkpoint", str(run_dir / name), "--epochs", "5",
                            "--num-workers", "0", "--device", "cpu", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        results = json.load(open(run_dir / "linear_eval.json"))
        assert results["knn_top1"] == pytest.approx(last["knn_top1"])  # same features, same kNN
        assert 0 <= results["linear_top1"] <= results["linear_top5"] <= 100
    result = run_script("eval_linear.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--random-init",
                        "--epochs", "1", "--num-workers", "0", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    baseline = json.load(open(run_dir / "linear_eval_random_init.json"))
    assert baseline["random_init"] and not json.load(open(run_dir / "linear_eval.json"))["random_init"]
    result = run_script("eval_linear.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--protocol", "augmented",
                        "--epochs", "1", "--num-workers", "0", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.load(open(run_dir / "linear_eval_augmented.json"))["protocol"] == "augmented"


@pytest.mark.parametrize("method", ["byol", "vicreg", "intl"])
def test_eval_linear_rebuilds_every_methods_backbone(eval_linear, tiny_run, method, tmp_path):
    """BYOL's checkpoint also holds its target and predictor; eval_linear takes the online backbone."""
    run = tiny_run(method)
    run_dir = shutil.copytree(run.run_dir, tmp_path / "tiny")
    result = run_script("eval_linear.py", "--checkpoint", str(run_dir / "checkpoint.pt"), "--epochs", "2",
                        "--num-workers", "0", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    last = [r for r in run.records if r["type"] == "eval"][-1]
    assert json.load(open(run_dir / "linear_eval.json"))["knn_top1"] == pytest.approx(last["knn_top1"])


def test_eval_linear_protocols_are_pinned_to_their_sources(eval_linear):
    """The INTL probe (winci-ai/INTL 0aa69af cifar/eval/evaluate.py): Adam 1e-2, weight decay 5e-6, batch 1000,
    500 epochs."""
    defaults = {k: v.default for k, v in inspect.signature(eval_linear.intl_linear_probe).parameters.items()
                if v.default is not inspect.Parameter.empty}
    assert defaults == dict(epochs=500, batch_size=1000, lr=1e-2, weight_decay=5e-6, seed=0)


def test_intl_probe_schedule_is_the_authors_exponential_decay(eval_linear):
    # gamma = (1e-6 / 1e-2)^(1/500): epoch 0 at 1e-2, epoch 250 at 1e-4, the last epoch just above 1e-6
    assert eval_linear.intl_probe_lr(0) == pytest.approx(1e-2)
    assert eval_linear.intl_probe_lr(1) == pytest.approx(1e-2 * 0.9817479430199844)
    assert eval_linear.intl_probe_lr(250) == pytest.approx(1e-4)
    assert eval_linear.intl_probe_lr(499) == pytest.approx(1e-2 * (1e-4) ** (499 / 500), rel=1e-12)
    assert eval_linear.intl_probe_lr(499) == pytest.approx(1.0186e-6, rel=1e-4)
    assert eval_linear.PROTOCOLS["intl"] == dict(epochs=500, batch_size=1000, lr=1e-2)


def test_intl_probe_learns_separable_raw_features_and_uses_its_settings(eval_linear):
    train, train_labels = separable_features(n_per_class=2500, seed=0)   # 10 batches of 1000 an epoch
    test, test_labels = separable_features(seed=1)
    seen = {}
    real_adam = torch.optim.Adam

    def recording_adam(params, **kwargs):
        seen.update(kwargs)
        return real_adam(params, **kwargs)

    with mock.patch.object(eval_linear.torch.optim, "Adam", recording_adam):
        top1, top5 = eval_linear.intl_linear_probe(train * 7 + 3, train_labels, test * 7 + 3, test_labels, 4, epochs=40)
    assert (top1, top5) == (100.0, 100.0) and seen == dict(lr=1e-2, weight_decay=5e-6)



def test_intls_imagenet_linear_protocol_steps_its_lr_at_60_and_80_and_starts_its_fc_as_its_evaluate(
        eval_linear, tiny_run, tmp_path):
    """winci-ai/INTL 0aa69af evaluate.py: fc N(0, 0.01) with zero bias, SGD 0.9, lr 0.4 x batch / 256, MultiStepLR
    [60, 80] gamma 0.1 over 100 epochs, weight decay 0 (1e-5 before e1d75d7)."""
    assert [eval_linear.step_lr(e, 100, 0.4) for e in (0, 59, 60, 79, 80, 99)] == \
        pytest.approx([0.4, 0.4, 0.04, 0.04, 0.004, 0.004])
    assert [eval_linear.step_lr(e, 10, 1.0) for e in (5, 6, 8)] == pytest.approx([1.0, 0.1, 0.01])
    assert eval_linear.PROTOCOLS["intl-imagenet"] == dict(epochs=100, batch_size=256, lr=0.4, weight_decay=0.0)
    run_dir = shutil.copytree(tiny_run("intl").run_dir, tmp_path / "tiny")
    args = eval_linear.parse_args(["--checkpoint", str(run_dir / "checkpoint.pt"), "--protocol", "intl-imagenet",
                                   "--epochs", "2", "--batch-size", "64", "--num-workers", "0", "--device", "cpu"])
    seen = []
    real_sgd, real_normal = torch.optim.SGD, torch.nn.init.normal_
    with mock.patch.object(eval_linear.torch.optim, "SGD", lambda params, **kw: seen.append(kw) or real_sgd(
            params, **kw)), mock.patch.object(eval_linear.nn.init, "normal_", lambda w, std: seen.append(std) or
                                              real_normal(w, std=std)):
        eval_linear.main(args)
    assert seen == [0.01, dict(lr=0.4 * 64 / 256, momentum=0.9, weight_decay=0.0)]
    results = json.load(open(run_dir / "linear_eval_intl-imagenet.json"))
    assert results["protocol"] == "intl-imagenet" and results["weight_decay"] == 0.0
    assert 0 <= results["linear_top1"] <= results["linear_top5"] <= 100

# ----------------------------------------------------------------------------------------------
# spectrum.py
# ----------------------------------------------------------------------------------------------


def test_feature_spectra_match_numpy_covariance_eigenvalues(spectrum):
    torch.manual_seed(5)
    backbone, projector = common.small_convnet().eval(), common.projection_mlp([256, 32, 8]).eval()
    images = torch.randn(64, 3, 16, 16)
    spectra = spectrum.feature_spectra(backbone, projector, images, batch_size=20)
    assert list(spectra) == ["block1", "block2", "block3", "block4", "representation", "projector"]
    with torch.no_grad():
        h = backbone(images)
        for name, x in (
            ("representation", h),
            ("projector", projector(h)),
            ("block1", backbone[:3](images).mean(dim=(2, 3))),
        ):
            expected = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False)))[::-1].clip(min=0)
            np.testing.assert_allclose(spectra[name].numpy(), expected, rtol=1e-6, atol=1e-10)
    stages = [name for name, _, _ in spectrum.feature_stages(common.build_backbone("resnet18", 32)[0])]
    assert stages == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_ortho_so_run_ends_closer_to_orthogonal_than_the_same_run_without(spectrum, synthetic, tmp_path):
    """8 LARS steps are too few for the paper's 1e-6 to show; 0.1 does."""
    errors = {}
    for kind in ("none", "so"):
        weight = ["--ortho-weight", "0.1"] if kind == "so" else []
        result = run_script("simclr.py", *TINY_RUN, "--ortho", kind, *weight, "--run-name", kind, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        shown = "0.1" if kind == "so" else "0"
        assert (
            f"--ortho {kind} (weight {shown}) covers 4 layers (backbone.0, backbone.3, backbone.6, backbone.9)"
            in result.stdout
        )
        records = [json.loads(line) for line in open(tmp_path / "runs" / kind / "metrics.jsonl")]
        train = [r for r in records if r["type"] == "train"]
        assert ("ortho" in train[0]) == (kind == "so")
        errors[kind] = [r["ortho_error"] for r in records if r["type"] == "eval"][-1]
    assert errors["so"] < 0.9 * errors["none"], errors
    result = run_script("spectrum.py", "runs/none/checkpoint.pt", "runs/so/checkpoint.pt", "--labels", "none", "SO",
                        "--out", "figs/spectrum", "--num-images", "40", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    curves = json.load(open(tmp_path / "figs/spectrum.json"))
    assert list(curves) == ["none", "SO"] and list(curves["SO"]["weights"]) == [f"backbone.{i}" for i in (0, 3, 6, 9)]
    weights = torch.load(tmp_path / "runs/so/checkpoint.pt", weights_only=True)["model"]["backbone.3.weight"]
    np.testing.assert_allclose(curves["SO"]["weights"]["backbone.3"]["values"],
                               np.linalg.svd(weights.double().reshape(64, -1).numpy(), compute_uv=False), rtol=1e-6)
    assert curves["SO"]["features"]["representation"]["erank"] >= 1


def test_mlp_from_state_dict_rebuilds_every_projector_layout(spectrum):
    for mlp in (common.projection_mlp([16, 32, 8]), common.projection_mlp([16, 32, 8], batch_norm=False),
                common.projection_mlp([16, 32, 32, 8], hidden_bias=False)):
        for name, tensor in mlp.state_dict().items():  # non-default BN statistics and affine parameters
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
        rebuilt = spectrum.mlp_from_state_dict(mlp.state_dict())
        x = torch.randn(10, 16)
        torch.testing.assert_close(rebuilt.eval()(x), mlp.eval()(x))



def test_spectrum_covers_the_layers_a_run_regularised_the_predictor_included(spectrum, tmp_path, monkeypatch,
                                                                              tiny_folder):
    byol = method_module("byol")
    monkeypatch.chdir(tmp_path)
    byol.main(byol.parse_args(folder_run(tiny_folder, "--epochs", "1", "--ortho", "so", "--ortho-heads",
                                         "--run-name", "heads")))
    run, spectra = spectrum.run_spectra("runs/heads/checkpoint.pt", 16, None, torch.device("cpu"))
    assert list(spectra["weights"]) == [f"backbone.{i}" for i in (0, 3, 6, 9)] + \
        ["projector.0", "projector.3", "predictor.0", "predictor.3"]
    assert len(spectra["weights"]["predictor.3"]) == 256 and len(spectra["features"]["projector"]) == 256

# ----------------------------------------------------------------------------------------------
# plot.py: the curves of runs
# ----------------------------------------------------------------------------------------------
# Two runs' records as the method files write them: an INTL run with a line cut short by a crash and a step
# logged again after its resume, and a VICReg run with other loss terms and no linear probe yet.
INTL_RECORDS = [
    {"type": "eval", "epoch": 0, "step": 0, "knn_top1": 20.0, "knn5_top1": 18.0, "knn5_euclidean_top1": 17.0,
     "online_top1": 10.0, "online_top5": 50.0, "rep_erank": 30.0, "rep_std": 0.2, "proj_erank": 9.0, "proj_std": 0.1,
     "ortho_error": 6.9},
    {"type": "train", "epoch": 1, "step": 1, "loss": 3.0, "alignment": 1.5, "trace": 40.0, "z_erank": 4.0,
     "zhat_erank": 90.0, "probe": 2.3, "lr": 0.1, "images_per_s": 50.0},
    {"type": "train", "epoch": 1, "step": 2, "loss": 2.5, "alignment": 1.2, "trace": 35.0, "z_erank": 5.0,
     "zhat_erank": 95.0, "probe": 2.2, "lr": 0.2, "images_per_s": 55.0},
    {"type": "eval", "epoch": 1, "step": 2, "knn_top1": 30.0, "knn5_top1": 28.0, "knn5_euclidean_top1": 26.0,
     "online_top1": 25.0, "online_top5": 70.0, "rep_erank": 40.0, "rep_std": 0.3, "proj_erank": 20.0, "proj_std": 0.2,
     "ortho_error": 6.9, "linear_top1": 45.0, "linear_top5": 90.0},
    {"type": "train", "epoch": 1, "step": 2, "loss": 2.4, "alignment": 1.1, "trace": 34.0, "z_erank": 6.0,
     "zhat_erank": 96.0, "probe": 2.1, "lr": 0.2, "images_per_s": 52.0},  # step 2 again, after a resume
]
VICREG_RECORDS = [
    {"type": "eval", "epoch": 0, "step": 0, "knn_top1": 21.0, "rep_erank": 31.0, "proj_erank": 8.0},
    {"type": "train", "epoch": 1, "step": 1, "loss": 24.0, "invariance": 0.5, "variance": 0.9, "covariance": 0.0,
     "probe": 2.3, "lr": 0.1, "images_per_s": 40.0},
    {"type": "eval", "epoch": 1, "step": 1, "knn_top1": 33.0, "rep_erank": 35.0, "proj_erank": 12.0},
]


@pytest.fixture
def plot():
    return method_module("plot")


@pytest.fixture
def two_runs(tmp_path):
    """runs/intl and runs/vicreg holding INTL_RECORDS and VICREG_RECORDS, the INTL one with a last line cut short."""
    for name, records in (("intl", INTL_RECORDS), ("vicreg", VICREG_RECORDS)):
        os.makedirs(tmp_path / "runs" / name)
        with open(tmp_path / "runs" / name / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
    with open(tmp_path / "runs" / "intl" / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "epoch": 2, "st')
    return [str(tmp_path / "runs" / name) for name in ("intl", "vicreg")]


def test_plot_curves_are_the_logged_numbers_by_epoch_and_step_the_last_written_winning(plot, two_runs, capsys):
    records = plot.read_records(two_runs[0])
    assert records == INTL_RECORDS and "left out 1 unreadable line" in capsys.readouterr().out
    curves = plot.curves(records)
    assert curves[("eval", "knn_top1")] == ([0, 1], [20.0, 30.0])
    assert curves[("eval", "linear_top1")] == ([1], [45.0]) and curves[("eval", "proj_erank")] == ([0, 1], [9.0, 20.0])
    assert curves[("train", "loss")] == ([1, 2], [3.0, 2.4])  # step 2's second record: the resumed run's
    assert curves[("train", "zhat_erank")] == ([1, 2], [90.0, 96.0]) and curves[("train", "lr")] == ([1, 2], [0.1, 0.2])
    runs = {"intl": curves, "vicreg": plot.curves(plot.read_records(two_runs[1]))}
    panels = {title: (x_axis, {label: dict(series) for label, series in lines.items()})
              for title, x_axis, lines in plot.panels(runs)}
    assert list(panels) == ["accuracy (%)", "loss", "loss terms", "effective rank", "effective rank, INTL's whitening"]
    x_axis, accuracy = panels["accuracy (%)"]
    assert x_axis == "epoch" and list(accuracy["intl"]) == ["online_top1", "knn_top1", "knn5_top1",
                                                            "knn5_euclidean_top1", "linear_top1"]
    assert accuracy["vicreg"] == {"knn_top1": ([0, 1], [21.0, 33.0])}
    assert panels["loss"] == ("step", {"intl": {"loss": ([1, 2], [3.0, 2.4])}, "vicreg": {"loss": ([1], [24.0])}})
    terms = panels["loss terms"][1]
    assert list(terms["intl"]) == ["alignment", "trace", "probe"] and terms["intl"]["trace"] == ([1, 2], [40.0, 34.0])
    assert list(terms["vicreg"]) == ["invariance", "variance", "covariance", "probe"]
    assert {label: list(series) for label, series in panels["effective rank"][1].items()} == \
        {"intl": ["rep_erank", "proj_erank"], "vicreg": ["rep_erank", "proj_erank"]}
    assert panels["effective rank, INTL's whitening"] == \
        ("step", {"intl": {"z_erank": ([1, 2], [4.0, 6.0]), "zhat_erank": ([1, 2], [90.0, 96.0])}, "vicreg": {}})


def test_plot_leaves_the_targets_ema_rates_out_of_the_loss_terms(plot):
    """BYOL's tau and INTL's --ema ema_m are the target's momenta, logged beside the loss, not terms of it."""
    byol = [{"type": "train", "epoch": 1, "step": 1, "loss": 3.0, "tau": 0.99, "probe": 2.3, "lr": 0.1}]
    intl_ema = [{"type": "train", "epoch": 1, "step": 1, "loss": 2.0, "alignment": 1.5, "trace": 10.0, "ema_m": 0.996,
                 "z_erank": 4.0, "zhat_erank": 90.0, "probe": 2.3, "lr": 0.1}]
    panels = {title: lines for title, _, lines in plot.panels({"byol": plot.curves(byol),
                                                               "intl": plot.curves(intl_ema)})}
    assert {label: list(series) for label, series in panels["loss terms"].items()} == \
        {"byol": ["probe"], "intl": ["alignment", "trace", "probe"]}


def test_plot_draws_one_png_with_a_line_per_run_and_series_in_each_panel(plot, two_runs, tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py draws with matplotlib (requirements.txt)")
    runs = {label: plot.curves(plot.read_records(run)) for label, run in zip(("intl", "vicreg"), two_runs)}
    panels = plot.panels(runs)
    figure = plot.draw(panels, list(runs), str(tmp_path / "direct.png"))
    counts = [len(ax.get_lines()) for ax in figure.axes if ax.has_data()]
    assert counts == [5 + 1, 1 + 1, 3 + 4, 2 + 2, 2 + 0]  # per panel: INTL's series + VICReg's
    assert [ax.get_yscale() for ax in figure.axes if ax.has_data()] == ["linear"] + ["log"] * 4
    first = figure.axes[0].get_lines()[1]  # INTL's knn_top1
    assert list(first.get_xdata()) == [0, 1] and list(first.get_ydata()) == [20.0, 30.0]
    result = run_script("plot.py", *two_runs, "--labels", "INTL", "VICReg", "--out", "figures/curves.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote figures/curves.png: accuracy (%), loss, loss terms, effective rank" in result.stdout
    png = (tmp_path / "figures" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_plot_bad_input_and_a_missing_matplotlib_end_in_one_line(plot, two_runs, tmp_path, monkeypatch, capsys):
    not_a_run = tmp_path / "not_a_run"
    os.makedirs(not_a_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as when it is not installed
    for argv, message in (([two_runs[0], str(not_a_run)], f"{not_a_run} holds no metrics.jsonl; pass run folders"),
                          ([two_runs[0], two_runs[0]], "2 runs need 2 different labels (--labels)"),
                          ([two_runs[0], "--labels", "a", "b"], "1 runs need 1 different labels"),
                          (two_runs, "plot.py draws with matplotlib (")):
        with pytest.raises(SystemExit) as exit_info:
            plot.main(plot.parse_args(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert err.strip().endswith(": pip install matplotlib") and not os.path.exists(tmp_path / "curves.png")


# ----------------------------------------------------------------------------------------------
# synthetic.py
# ----------------------------------------------------------------------------------------------


def test_synthetic_images_are_deterministic_balanced_and_seeded(synthetic):
    images, labels = synthetic.make_synthetic_images(200, seed=3)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [20] * 10
    again, again_labels = synthetic.make_synthetic_images(200, seed=3)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    other, _ = synthetic.make_synthetic_images(200, seed=4)
    assert not np.array_equal(images, other)
    assert images.std() > 20  # not a blank canvas


# ----------------------------------------------------------------------------------------------
# bench.py
# ----------------------------------------------------------------------------------------------


def test_bench_speed_runs_each_method_for_its_warmup_and_timed_steps(tmp_path, monkeypatch):
    bench, byol = method_module("bench"), method_module("byol")
    monkeypatch.chdir(tmp_path)
    args = bench.parse_args(["speed", "--methods", "byol", "--arch", "convnet", "--synthetic-size", "300",
                             "--batch-size", "64", "--steps", "2", "--warmup", "1", "--num-workers", "0", "--device",
                             "cpu", "--skip", "flops"])
    assert args.precision == "fp32"  # auto on the CPU
    with mock.patch.object(byol, "ema_update", wraps=byol.ema_update) as ema, \
            mock.patch.object(byol, "build_optimizer", wraps=byol.build_optimizer) as optimizer:
        results = bench.bench_speed(args)
    assert ema.call_count == 2 * 3  # (b) and (c): one warm-up and two timed optimiser steps each
    # the reference recipe's optimiser (LARS, lr 1.0 x 64/256), not the offline check's SGD, on synthetic data
    assert [(c.args[0], c.args[2], c.args[3]) for c in optimizer.call_args_list] == [("lars", 0.25, 1e-5)] * 2
    row = results["methods"]["byol"]
    assert row["augmentations"] == "asymmetric" and all(row[key] > 0 for key in ("data", "step", "end_to_end", "pil"))
    assert row["data_per_core"] == pytest.approx(row["data"] / torch.get_num_threads())
    assert row["pil_per_core"] == pytest.approx(row["pil"])  # no workers: one core

    class TwoBatches(list):
        generator = None

    ready = bench.TimedLoader(TwoBatches(["first", "second"]), 1, 3, torch.device("cpu"), ready=True)
    assert list(ready) == ["first"] * 4 and len(ready.times) == 5  # one batch repeated: no data cost
    fed = bench.TimedLoader(TwoBatches(["first", "second"]), 1, 3, torch.device("cpu"))
    assert list(fed) == ["first", "second"] * 2  # a short epoch: the next one starts


def test_bench_counts_the_flops_of_a_step_and_their_rate(tmp_path, monkeypatch):
    """SimCLR with the convnet: its four 3x3 convs cost F = 2 x (3*32*32^2 + 32*64*16^2 + 64*128*8^2 +
    128*256*4^2) x 9 = 30,081,024 FLOP per view forward; a step is at least 2 views x B x (3F - the first
    conv's forward, whose input needs no gradient); the count doubles with the batch."""
    bench = method_module("bench")
    monkeypatch.chdir(tmp_path)
    flops = {}
    for batch in ("32", "64"):
        args = bench.parse_args(["speed", "--methods", "simclr", "--arch", "convnet", "--synthetic-size", "300",
                                 "--batch-size", batch, "--steps", "1", "--warmup", "0", "--num-workers", "0",
                                 "--device", "cpu", "--skip", "data", "pil", "--peak-tflops", "2.0"])
        row = bench.bench_speed(args)["methods"]["simclr"]
        flops[int(batch)] = row["tflop_per_step"] * 1e12
        assert row["tflops"] == pytest.approx(row["tflop_per_step"] * row["end_to_end"] / int(batch))
        assert row["share_of_peak"] == pytest.approx(row["tflops"] / 2.0)
    conv_forward, first_conv = 30_081_024, 2 * 3 * 32 * 32 * 32 * 9
    assert flops[64] >= 2 * 64 * (3 * conv_forward - first_conv)
    assert flops[64] < 1.2 * 2 * 64 * (3 * conv_forward - first_conv)     # the heads and the loss are small
    assert flops[64] / flops[32] == pytest.approx(2.0, rel=0.01)


# ----------------------------------------------------------------------------------------------
# reproduce.py: the results table
# ----------------------------------------------------------------------------------------------


def test_reproduce_trains_each_run_and_writes_one_table(synthetic, tmp_path):
    result = run_script("reproduce.py", "--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "64",
                        "--epochs", "2", "--methods", "intl", "simclr", "--device", "cpu", "--out", "rep",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.load(open(tmp_path / "rep" / "results.json"))
    assert [r["name"] for r in results["runs"]] == ["intl-s0", "simclr-s0"] and results["failed"] == []
    for row in results["runs"]:
        evals = [json.loads(line) for line in open(tmp_path / "rep" / "runs" / row["name"] / "metrics.jsonl")]
        evals = [r for r in evals if r["type"] == "eval" and r["epoch"] > 0]
        assert row["knn_best"] == max(r["knn_top1"] for r in evals) and row["knn_last"] == evals[-1]["knn_top1"]
        assert row["online_last"] == evals[-1]["online_top1"] and (row["epochs"], row["batch"]) == (2, 64)
    table = open(tmp_path / "rep" / "results.md").read()
    assert table.count("| intl-s0 | 2 | 64 |") == 1 and table.rstrip().endswith("| — |")  # no reference: a dash
    again = run_script("reproduce.py", "--dataset", "synthetic", "--epochs", "2", "--out", "rep", cwd=tmp_path)
    assert again.returncode == 2 and "nothing is overwritten" in again.stderr   # an earlier table is kept


def test_reproduce_stopped_by_sigterm_stops_its_runs_with_checkpoints_and_tables_how_far_they_got(synthetic,
                                                                                                   tmp_path):
    """A time limit (timeout's SIGTERM) must not lose a GPU window: every running run gets SIGTERM, checkpoints
    and exits 143, no further run starts, and the table shows each stopped run's last evaluation as "k of N
    (stopped)" with no published number beside it (another budget)."""
    command = [sys.executable, os.path.join(HERE, "reproduce.py"), "--dataset", "synthetic", "--synthetic-size",
               "256", "--batch-size", "64", "--epochs", "200", "--eval-every", "1", "--methods", "simclr", "byol",
               "intl", "--parallel", "2", "--device", "cpu", "--out", "rep"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / "rep" / "logs" / f"{name}-s0.log" for name in ("simclr", "byol")]
    for _ in range(600):  # both running runs have evaluated their first epoch
        if all(log.exists() and "eval epoch 1:" in log.read_text() for log in logs):
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "SIGTERM: stopping simclr-s0, byol-s0; not starting intl-s0" in stdout
    results = json.load(open(tmp_path / "rep" / "results.json"))
    assert [r["name"] for r in results["runs"]] == ["simclr-s0", "byol-s0"]
    assert results["failed"] == ["intl-s0 (not started)"]
    table = open(tmp_path / "rep" / "results.md").read()
    for row, log in zip(results["runs"], logs):
        assert 1 <= row["epochs"] < row["budget"] == 200 and f"| {row['epochs']} of 200 (stopped) |" in table
        assert "error: stopped by SIGTERM; continue from the checkpoint" in log.read_text()
        checkpoint = torch.load(tmp_path / "rep" / "runs" / row["name"] / "checkpoint.pt", weights_only=True)
        assert checkpoint["epoch"] >= row["epochs"] and checkpoint["global_step"] >= 4 * row["epochs"]
    assert not (tmp_path / "rep" / "runs" / "intl-s0").exists()


def test_reproduce_puts_the_published_number_beside_ours_only_at_the_same_budget():
    reproduce = method_module("reproduce")
    row = dict(name="byol-s0", method="byol", recipe="cifar", epochs=200, batch=512, seconds=300.0, images_per_s=9000.0,
               knn_best=85.2, knn_last=85.0, online_last=80.1, knn5_euclidean_last=84.0, linear_last=86.0)
    line = reproduce.table([row]).splitlines()[-1]
    assert "| 85.2 / 85.0 | 80.1 | 86.0 | 86.8 (weighted kNN, best epoch; ours 85.2) — lightly" in line
    assert reproduce.table([{**row, "batch": 256}]).splitlines()[-1].endswith("| — |")      # another budget
    line = reproduce.table([{**row, "method": "intl", "epochs": 1000, "batch": 256}]).splitlines()[-1]
    assert "90.03 (INTL 5-NN (Euclidean); ours 84.0)" in line
    imagenet100 = {**row, "recipe": "imagenet100", "epochs": 400, "batch": 256}
    assert "| 79.76 (online probe; ours 80.1) — solo-learn fca55e3 README, ImageNet-100" in \
        reproduce.table([imagenet100]).splitlines()[-1]
    assert reproduce.table([{**imagenet100, "recipe": "cifar"}]).splitlines()[-1].endswith("| — |")  # another setting
    imagenet = {**row, "method": "intl", "recipe": "imagenet", "epochs": 800, "batch": 256}
    line = reproduce.table([imagenet]).splitlines()[-1]
    assert "76.6 (linear (INTL's ImageNet protocol); ours not in this table)" in line
    name, argv = reproduce.run_command("byol --ortho so", 3, reproduce.parse_args(["--epochs", "5", "--out", "x"]))
    assert name == "byol-ortho-so-s3" and argv[-2:] == ["--ortho", "so"] and "--seed" in argv


# ----------------------------------------------------------------------------------------------
# smoke.py and gpu_check.sh: every GPU path first, then speed and the results table
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def smoke():
    return method_module("smoke")


def test_smoke_covers_every_method_pipeline_mode_and_precision_compile_first(smoke):
    paths, skipped = smoke.smoke_paths(METHOD_NAMES)
    for method in METHOD_NAMES:
        for pipeline in ("tensor", "pil"):
            for mode in ("plain", "overlap", "compile"):
                path = f"{method}/{pipeline}/bf16/{mode}"
                assert path in (skipped if (pipeline, mode) == ("pil", "overlap") else paths)
        assert skipped[f"{method}/pil/bf16/overlap"] == "--overlap applies to the tensor pipeline only"
        assert {f"{method}/tensor/{precision}/plain" for precision in ("fp32", "fp16")} <= set(paths)
        assert {f"{method}/tensor/bf16/resume", f"{method}/tensor/bf16/resume-deterministic"} <= set(paths)
    assert len(paths) == 4 * 9 and len(skipped) == 4 and len(set(paths)) == len(paths)
    assert all(path.endswith("/compile") for path in paths[:8])  # compiling is slowest: it starts first
    assert set(paths) | set(skipped) == set(smoke.all_paths(METHOD_NAMES))
    paths, _ = smoke.smoke_paths(METHOD_NAMES, ["plain", "overlap", "resume"])  # gpu_check.sh's rerun of these
    assert len(paths) == 8 and all(path.endswith("/compile") for path in paths)
    paths, skipped = smoke.smoke_paths(["byol"], ["compile", "resume"], device="cpu")
    assert paths == ["byol/tensor/bf16/plain", "byol/tensor/bf16/overlap", "byol/pil/bf16/plain",
                     "byol/tensor/fp32/plain"]
    assert skipped["byol/tensor/fp16/plain"] == "--precision fp16 needs a GPU"
    assert skipped["byol/tensor/bf16/resume-deterministic"] == "left out by --skip compile resume"


def test_smoke_summary_has_one_line_per_path_as_each_ends(smoke, tmp_path, monkeypatch):
    """`ok PATH SECONDS s[: detail]`, `failed PATH: last error line` (its log's end in smoke_failures.txt),
    `skipped PATH: why`, in the paths' order; exit 1 when one failed. No path starts once the budget is spent."""
    def check(path, args, data_dir, deadline):
        if path == "simclr/tensor/bf16/plain":
            raise smoke.Failed("RuntimeError: CUDA error: an illegal memory access was encountered")
        return "bit-exact (9 tensors)" if path.endswith("deterministic") else ""

    monkeypatch.setattr(smoke, "check", check)
    out = tmp_path / "smoke"
    with pytest.raises(SystemExit) as exit_info:
        smoke.main(smoke.parse_args(["--out", str(out), "--methods", "simclr", "--device", "cpu", "--images", "40",
                                     "--batch-size", "8"]))
    assert exit_info.value.code == 1
    lines = open(out / "smoke.txt").read().splitlines()
    assert lines[0].startswith("# smoke of every GPU path: cpu, resnet18, 40 images, batch 8;")
    assert [line.split()[1].rstrip(":") for line in lines[1:]] == smoke.all_paths(["simclr"])
    assert lines[1] == "failed simclr/tensor/bf16/plain: RuntimeError: CUDA error: an illegal memory access was " \
                       "encountered"
    assert re.fullmatch(r"ok simclr/tensor/bf16/overlap \d+\.\d s", lines[2])
    assert re.fullmatch(r"ok simclr/tensor/bf16/resume-deterministic \d+\.\d s: bit-exact \(9 tensors\)", lines[9])
    assert lines[5] == "skipped simclr/pil/bf16/overlap: --overlap applies to the tensor pipeline only"
    assert lines[8] == "skipped simclr/tensor/fp16/plain: --precision fp16 needs a GPU"
    assert open(out / "smoke_failures.txt").read().startswith(f"== {lines[1]}\n(not started)")  # no log: no run
    assert len(os.listdir(out / "data" / "train")) == 10 and len(os.listdir(out / "data" / "test" / "class0")) == 1
    with pytest.raises(SystemExit) as exit_info:
        smoke.main(smoke.parse_args(["--out", str(tmp_path / "late"), "--methods", "intl", "--budget", "5"]))
    lines = open(tmp_path / "late" / "smoke.txt").read().splitlines()
    assert exit_info.value.code == 1 and lines[1] == ("failed intl/tensor/bf16/plain: not started, the 5 s budget "
                                                      "was spent (raise --budget or --parallel)")


def ended(pid, wait=5.0):
    """Whether process `pid` ends within `wait` seconds (a zombie has ended, until its new parent reaps it)."""
    for _ in range(int(wait * 10)):
        try:
            if "State:\tZ" in open(f"/proc/{pid}/status").read():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_smoke_step_fails_with_its_last_error_line_and_a_time_limit_ends_its_process_group(smoke, tmp_path):
    log = tmp_path / "step.log"
    crash = "import sys; print('epoch 1/1 step 1/5'); sys.exit('error: out of memory on cuda; resume')"
    with pytest.raises(smoke.Failed, match=r"^error: out of memory on cuda; resume$"):
        smoke.run_step([sys.executable, "-c", crash], log, time.monotonic() + 60)
    smoke.run_step([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], log,
                   time.monotonic() + 60, expect=-signal.SIGTERM)
    hang = ("import subprocess, sys, time; worker = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); print(worker.pid); print('started', flush=True); time.sleep(60)")
    with pytest.raises(smoke.Failed, match=r"^timed out after 2 s; last line: started$"):
        smoke.run_step([sys.executable, "-c", hang], log, time.monotonic() + 2)
    assert ended(open(log).read().splitlines()[-2])  # the worker it started too
    assert smoke.last_error_line("Traceback (most recent call last):\n  File x\nRuntimeError: boom\nwarning: x\n") \
        == "RuntimeError: boom"
    assert open(log).read().startswith(f"$ {sys.executable} -c ")


def test_smoke_stopped_by_sigterm_ends_the_runs_it_started(smoke, tmp_path):
    """A time limit on smoke.py (timeout's SIGTERM) must not leave its runs, in their own sessions, on the GPU."""
    code = ("import sys, smoke\n"
            "def check(path, args, data_dir, deadline):\n"
            "    log = f\"{args.out}/logs/{path.replace('/', '-')}.log\"\n"
            "    sleep = 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'\n"
            "    smoke.run_step([sys.executable, '-c', sleep], log, deadline)\n"
            "smoke.check = check\n"
            "smoke.main(smoke.parse_args(['--out', 'out', '--methods', 'simclr', '--device', 'cpu',\n"
            "                             '--parallel', '2']))")
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE})
    logs = [tmp_path / "out" / "logs" / f"simclr-{pipeline}-bf16-compile.log" for pipeline in ("tensor", "pil")]
    for _ in range(300):
        if all(log.exists() and len(log.read_text().splitlines()) == 2 for log in logs):
            break
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=30) == 143
    assert all(ended(log.read_text().splitlines()[1]) for log in logs)


def test_smoke_and_gpu_check_refuse_bad_input_in_one_line(smoke, tmp_path, capsys):
    for argv, expected in ((["--skip", "compil"], "--skip compil: not a part of a path"),
                           (["--images", "64"], "--images 64 makes fewer than 2 steps of --batch-size 64")):
        with pytest.raises(SystemExit) as exit_info:
            smoke.parse_args(argv + ["--device", "cpu", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "STAGES": "smoke speed"}
    result = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: STAGES: no stage speed (smoke, bench, reproduce)\n"
    assert not (tmp_path / "out").exists()  # nothing started
    if not os.path.exists(os.path.join(HERE, ".gpu")):  # a checkout with the data would start the stage
        result = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], env={**env, "STAGES": "reproduce"},
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("error: no .gpu/cifar10.tar.gz: cp ../shared")


def test_bench_deterministic_lever_runs_the_methods_with_deterministic(tmp_path, capsys):
    bench, simclr = method_module("bench"), method_module("simclr")
    args = bench.parse_args(["speed", "--device", "cpu", "--deterministic"])
    assert bench.method_args(simclr, args, str(tmp_path), "tensor").deterministic
    assert not bench.method_args(simclr, bench.parse_args(["speed", "--device", "cpu"]), str(tmp_path),
                                 "tensor").deterministic
    bench.print_speed({**bench.hardware(torch.device("cpu")), "arch": "convnet", "batch_size": 8, "precision": "fp32",
                       "compile": None, "overlap": False, "deterministic": True, "dataset": "synthetic",
                       "num_workers": 0, "methods": {}})
    assert capsys.readouterr().out.startswith("convnet, batch 8, fp32, --deterministic, synthetic, on ")


@pytest.mark.slow
def test_gpu_check_smoke_in_its_cpu_form_has_one_ok_line_per_path(smoke, tmp_path):
    """gpu_check.sh's first stage as the CPU runs it (the convnet; the compile paths left out, fp16 needs a GPU): every
    other path ok, the deterministic resumes bit-exact, and $OUT holds what the device tool returns."""
    out = tmp_path / "out"
    env = {**os.environ, "STAGES": "smoke", "DEVICE": "cpu", "ARCH": "convnet", "PARALLEL": "2", "OUT": str(out),
           "WORK": str(tmp_path / "work"), "PYTHON": sys.executable, "SMOKE_BUDGET": "1500",
           "SMOKE_ARGS": "--skip compile --images 128 --batch-size 32 --timeout 600"}
    result = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], env=env, capture_output=True, text=True,
                            timeout=1600)
    assert result.returncode == 0, result.stdout + result.stderr
    paths, skipped = smoke.smoke_paths(METHOD_NAMES, ["compile"], "cpu")
    lines = [line for line in open(out / "smoke.txt").read().splitlines() if not line.startswith("#")]
    assert sorted(line.split()[1] for line in lines if line.startswith("ok ")) == sorted(paths), lines
    assert len(lines) == len(paths) + len(skipped) and len(skipped) == 4 * 4  # pil x overlap, compile x 2, fp16
    assert all(": SIGTERM at step 6, resumed: bit-exact (" in line for line in lines if "deterministic" in line)
    assert sorted(os.listdir(out)) == ["details.tar.gz", "machine.txt", "smoke.txt"]
