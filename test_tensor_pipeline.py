"""tensor_pipeline.py (optional): the batched augmentations against torchvision's, one image at a time; the
random draws of every sampled parameter; the loaders against the PIL pipeline's; the folder cache."""
import json
import math
import os
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import common
from conftest import TINY_RUN, method_module, run_script, write_image_folder, write_unlabelled_tree

tensor_pipeline = pytest.importorskip("tensor_pipeline", reason="tensor_pipeline.py is not beside common.py")


BICUBIC = common.T.InterpolationMode.BICUBIC


def random_images(num, height=32, width=32, seed=0):
    return torch.rand(num, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (32, 40, 24), (96, 96, 64)])
def test_batched_resized_crop_and_flip_equal_torchvision_per_image(height, width, size):
    """Crops smaller and larger than the output (upsampling and antialiased downsampling), full
    frame, edge boxes; the flip folded into the column weights equals a flip of the output."""
    images = 0.3 + 0.4 * random_images(6, height,
                                       width)  # no bicubic overshoot out of [0, 1]: PIL's clip between passes is idle
    top = torch.tensor([0, 3, height - 5, 0, 1, 7])
    left = torch.tensor([0, 7, width - 9, 0, 2, 1])
    h = torch.tensor([height, 10, 5, 4, height - 1, 20])
    w = torch.tensor([width, 15, 9, width, width - 2, 3])
    flip = torch.tensor([False, True, False, True, True, False])
    out = tensor_pipeline.resized_crop(images, top, left, h, w, size, flip=flip)
    assert out.shape == (6, 3, size, size)
    for b in range(6):
        expected = TF.resized_crop(images[b], int(top[b]), int(left[b]), int(h[b]), int(w[b]), [size, size],
                                   BICUBIC, antialias=True).clamp(0, 1)
        expected = TF.hflip(expected) if flip[b] else expected
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-5)


def test_batched_resized_crop_matches_the_pil_path_within_its_rounding():
    """Noise images, whose bicubic overshoot PIL clips between its passes: within PIL's rounding of
    its uint8 intermediate (torchvision's tensor resize, which does not clip, is up to 14 levels off)."""
    images = (random_images(4) * 255).round()
    boxes = [(0, 0, 32, 32), (3, 5, 12, 20), (10, 2, 22, 27), (20, 20, 6, 7)]
    top, left, h, w = (torch.tensor(column) for column in zip(*boxes))
    out = tensor_pipeline.resized_crop(images / 255, top, left, h, w, 32) * 255
    for b, (i, j, bh, bw) in enumerate(boxes):
        pil = Image.fromarray(images[b].permute(1, 2, 0).numpy().astype(np.uint8))
        expected = torch.from_numpy(np.array(TF.resized_crop(pil, i, j, bh, bw, [32, 32], BICUBIC))).permute(2, 0, 1)
        assert (out[b] - expected.float()).abs().max() <= 1.1


@pytest.mark.parametrize("which,torchvision_op", [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                                   (2, TF.adjust_saturation)])
def test_blends_equal_torchvision_brightness_contrast_saturation(which, torchvision_op):
    images, factors = random_images(5), torch.tensor([0.0, 0.4, 1.0, 1.3, 1.8])
    jitter = SimpleNamespace(factors=torch.ones(5, 3), hue_shift=torch.zeros(5),
                             blend_order=torch.tensor([[which, (which + 1) % 3, (which + 2) % 3]] * 5),
                             hue_position=torch.full((5,), 3))  # the hue (shift 0) after the three blends
    jitter.factors[:, which] = factors
    out = tensor_pipeline.color_jitter(images, jitter)
    for b in range(5):
        torch.testing.assert_close(out[b], torchvision_op(images[b], float(factors[b])), rtol=0, atol=2e-6)


def test_hue_grayscale_blur_and_solarize_equal_torchvision():
    images = random_images(5)
    images[0, :, :4] = 0.5          # grey pixels: zero saturation, hue undefined
    images[1, 1] = images[1, 0]     # R == G ties
    shifts = torch.tensor([0.0, 0.1, -0.5, 0.33, -0.07])
    hue = tensor_pipeline.adjust_hue(images, shifts)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    blurred = tensor_pipeline.gaussian_blur(images, sigmas, 7)
    gray = tensor_pipeline.grayscale(images)
    for b in range(5):
        torch.testing.assert_close(hue[b], TF.adjust_hue(images[b], float(shifts[b])), rtol=0, atol=2e-6)
        torch.testing.assert_close(blurred[b], TF.gaussian_blur(images[b], [7, 7], [float(sigmas[b])] * 2), rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(gray[b], TF.rgb_to_grayscale(images[b]), rtol=0, atol=1e-7)
    # solarize as in the view: pixels >= 128/255 inverted, as PIL's solarize(threshold=128) on uint8
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    view = tensor_pipeline.BatchedView(16, (0.0,) * 3, (1.0,) * 3, crop_scale=(1.0, 1.0), jitter_p=0, gray_p=0,
                              solarize_p=1.0, flip_p=0)
    pil = Image.fromarray(levels[0].permute(1, 2, 0).numpy())
    expected = torch.from_numpy(np.array(TF.solarize(pil, 128))).permute(2, 0, 1).float() / 255
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(view(levels, generator)[0], expected, rtol=0, atol=1e-6)


def test_color_jitter_applies_the_drawn_order_like_torchvision():
    """Each image's (blend order, hue position) is one of torchvision's 24 orders: applying
    torchvision's adjust_* in that order to the single image gives the same result."""
    images = random_images(24, seed=1)
    generator = torch.Generator().manual_seed(3)
    jitter = tensor_pipeline.sample_color_jitter(24, 0.8, 0.8, 0.8, 0.2, 1.0, generator)
    out = tensor_pipeline.color_jitter(images, jitter)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(24):
        order = jitter.blend_order[b].tolist()
        order.insert(int(jitter.hue_position[b]), 3)
        params = jitter.factors[b].tolist() + [float(jitter.hue_shift[b])]
        expected = images[b]
        for op in order:
            expected = ops[op](expected, params[op])
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-5)


def test_color_jitter_draws_uniform_orders_and_factors_in_range():
    generator = torch.Generator().manual_seed(0)
    jitter = tensor_pipeline.sample_color_jitter(24_000, 0.4, 0.4, 0.2, 0.1, 0.8, generator)
    applied = jitter.hue_shift != 0
    assert abs(applied.float().mean().item() - 0.8) < 0.01
    f = jitter.factors[applied]
    assert f[:, :2].min() >= 0.6 and f[:, :2].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2
    assert f.mean(0).numpy() == pytest.approx([1.0, 1.0, 1.0], abs=0.01)
    assert jitter.hue_shift.abs().max() <= 0.1 and (jitter.factors[~applied] == 1).all()
    code = (jitter.blend_order * torch.tensor([9, 3, 1])).sum(1) * 4 + jitter.hue_position  # one of 24 orders
    counts = torch.bincount(code, minlength=4 * 27)[code.unique()]
    assert len(counts) == 24
    chi2 = ((counts - 1000.0) ** 2 / 1000.0).sum().item()
    assert chi2 < 49.7  # 99.9% quantile of chi-square with 23 degrees of freedom


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf = lambda x: np.searchsorted(x, grid, side="right") / len(x)  # noqa: E731
    return np.abs(cdf(a) - cdf(b)).max()


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.08, 1.0)), (32, 32, (0.2, 1.0)), (96, 64, (0.08, 1.0)),
                                                (40, 10, (0.5, 1.0))])
def test_crop_boxes_follow_torchvision_distribution(height, width, scale):
    """Scale (area fraction), log aspect ratio and position of many draws: KS distance to
    torchvision's RandomResizedCrop.get_params below the 0.1% critical value. The (40, 10) image
    often falls back to the central crop: the fallback's share matches too."""
    n, ratio = 6000, (3 / 4, 4 / 3)
    generator = torch.Generator().manual_seed(0)
    top, left, h, w = tensor_pipeline.sample_crop_boxes(n, height, width, scale, ratio, generator)
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    reference = np.array([common.T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)])
    ours = torch.stack([top, left, h, w], 1).numpy()
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    critical = 1.95 * math.sqrt(2 / n)  # alpha = 0.001
    for name, column in (("area", lambda x: x[:, 2] * x[:, 3] / (height * width)),
                         ("log aspect", lambda x: np.log(x[:, 3] / x[:, 2])),
                         ("top", lambda x: x[:, 0]), ("left", lambda x: x[:, 1])):
        assert ks_statistic(column(ours), column(reference)) < critical, name


@pytest.mark.parametrize("recipe", ["symmetric", "asymmetric", "vicreg"])
def test_every_random_draw_of_both_views_has_its_range_sign_and_probability(recipe):
    """20,000 images' draws of each view of a recipe: every coin (flip, jitter, grayscale, blur, solarisation)
    comes up with its recipe's probability (within 5 binomial standard deviations), every factor stays in its
    range with mean 1, the hue shift takes both signs equally, blur sigma is uniform on [0.1, 2], the crop area
    lies in the recipe's scale, and a view without blur or solarisation draws none."""
    n = 20_000
    for settings in common.recipe_settings(recipe, 32):
        view = tensor_pipeline.BatchedView(mean=(0.5,) * 3, std=(0.25,) * 3, **settings)
        draws = view.sample(n, 32, 32, torch.Generator().manual_seed(0))
        full = {**dict(jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0, flip_p=0.5, crop_scale=(0.08, 1.0),
                       brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), **settings}

        def near(coins, p):
            return abs(coins.float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9

        assert near(draws.flip, full["flip_p"]) and near(draws.gray, full["gray_p"])
        applied = (draws.jitter.factors != 1).any(dim=1) | (draws.jitter.hue_shift != 0)
        assert near(applied, full["jitter_p"])
        for column, name in enumerate(("brightness", "contrast", "saturation")):
            factors = draws.jitter.factors[applied, column]
            assert factors.min() >= 1 - full[name] and factors.max() <= 1 + full[name]
            assert factors.mean().item() == pytest.approx(1.0, abs=0.01)
        shifts = draws.jitter.hue_shift[applied]
        assert shifts.abs().max() <= full["hue"] and near(shifts > 0, 0.5)
        area = (draws.h * draws.w).float() / (32 * 32)
        scale = full["crop_scale"]  # rounded to whole pixels: within a pixel row of the scale
        assert area.min() >= scale[0] - 2 / 32 and area.max() <= 1 and area.median() > scale[0]
        assert hasattr(draws, "blur") == (full["blur_p"] > 0) and hasattr(draws, "solarize") == (full["solarize_p"] > 0)
        if full["blur_p"] > 0:
            assert near(draws.blur, full["blur_p"])
            assert draws.sigma.min() >= 0.1 and draws.sigma.max() < 2.0
            assert ks_statistic(draws.sigma.numpy(), np.linspace(0.1, 2.0, n)) < 1.95 * math.sqrt(2 / n)
        if full["solarize_p"] > 0:
            assert near(draws.solarize, full["solarize_p"])

def test_batched_views_give_every_image_its_own_draws_and_keep_the_shape():
    image = (random_images(1) * 255).to(torch.uint8)
    view1, view2 = (tensor_pipeline.BatchedView(mean=(0.5,) * 3, std=(0.25,) * 3, **settings)
                    for settings in common.recipe_settings("symmetric", 32))
    generator = torch.Generator().manual_seed(0)
    batch = image.expand(8, 3, 32, 32)
    x1, x2 = view1(batch, generator), view2(batch, generator)
    assert x1.shape == x2.shape == (8, 3, 32, 32) and x1.dtype == torch.float32
    views = torch.cat([x1, x2]).flatten(1)
    distances = torch.cdist(views, views) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3
    # grayscale with probability 0.2: equal channels in about a fifth of many views
    many = view1(image.expand(4000, 3, 32, 32), generator)
    gray = ((many[:, 0] * 0.25 + 0.5) - (many[:, 1] * 0.25 + 0.5)).abs().amax(dim=(1, 2)) < 1e-5
    assert abs(gray.float().mean().item() - 0.2) < 0.025


def test_batched_view_of_a_full_frame_without_jitter_is_the_normalised_image():
    images = (random_images(3) * 255).to(torch.uint8)
    view = tensor_pipeline.BatchedView(32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), crop_scale=(1.0, 1.0), jitter_p=0,
                              gray_p=0, flip_p=0)
    expected = (images.float() / 255 - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[
        :, None, None
    ]
    torch.testing.assert_close(view(images, torch.Generator().manual_seed(0)), expected, rtol=0, atol=1e-5)


def test_blur_p_reaches_the_views_of_both_pipelines():
    """--blur-p (None: the recipe's) sets the blur probability of both views, in both pipelines."""
    pytest.importorskip("synthetic", reason="synthetic.py is not beside common.py")
    for pipeline in ("tensor", "pil"):
        for blur_p, expected in ((None, 0.5), (0.0, 0.0)):
            args = SimpleNamespace(dataset="synthetic", data_dir="unused", eval_data_dir=None, synthetic_size=64,
                                   image_size=None, augmentations="symmetric", batch_size=32, seed=0, device="cpu",
                                   num_workers=0, pipeline=pipeline, skip_bad_images=False, overlap=False,
                                   blur_p=blur_p)
            loader = common.build_data(args).train_loader
            if pipeline == "tensor":
                assert loader.view1.blur_p == loader.view2.blur_p == expected
            else:
                views = loader.dataset.dataset.transform
                blurs = [[t.p for t in view.transforms if isinstance(t, common.T.RandomApply) and
                          isinstance(t.transforms[0], common.T.GaussianBlur)] for view in views.transforms]
                assert blurs == ([[0.5], [0.5]] if expected else [[], []])


def test_overlap_augments_one_batch_ahead_and_yields_the_same_batches():
    """--overlap: batch k + 1 is augmented before batch k is handed over (on a GPU, on a side stream), and the
    batches are exactly those without it, epoch after epoch; a run with it trains to the same losses."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8))
    labels = torch.arange(40) % 4
    calls = []

    class CountedView(tensor_pipeline.BatchedView):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    view1, view2 = (CountedView(mean=(0.5,) * 3, std=(0.25,) * 3, **settings)
                    for settings in common.recipe_settings("vicreg", 16))
    loaders = [tensor_pipeline.TensorTwoViewLoader(images, labels, view1, view2, 8, torch.device("cpu"), overlap=o)
               for o in (False, True)]
    for overlap, loader in enumerate(loaders):
        calls.clear()
        common.set_data_epoch(loader, 0, 0)
        next(iter(loader))
        assert len(calls) == 2 * (1 + overlap)  # two views of one batch, or of two
    for epoch in (0, 1):
        for loader in loaders:
            common.set_data_epoch(loader, 5, epoch)
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == 5
        for ((a1, a2), la), ((b1, b2), lb) in zip(*batches):
            assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(la, lb)


@pytest.mark.slow  # the loader test above checks the batches themselves in the default suite
def test_overlap_run_trains_to_the_same_losses(tmp_path):
    runs = {}
    for overlap in ((), ("--overlap",)):
        result = run_script("simclr.py", *TINY_RUN, "--arch", "convnet", "--epochs", "1", "--pipeline", "tensor",
                            *overlap, "--run-name", f"overlap{len(overlap)}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        records = map(json.loads, open(tmp_path / "runs" / f"overlap{len(overlap)}" / "metrics.jsonl"))
        runs[overlap] = [r["loss"] for r in records if r["type"] == "train"]
    assert len(runs[()]) == 4 and runs[()] == runs[("--overlap",)]


def test_both_pipelines_evaluate_on_the_same_evenly_spaced_training_images(monkeypatch):
    """Above EVAL_TRAIN_IMAGES (7 here) kNN and the probes learn from evenly spaced training images: the same ones
    in both pipelines, images floor(i 599 / 6) of the 600."""
    for module in (common, tensor_pipeline):
        monkeypatch.setattr(module, "EVAL_TRAIN_IMAGES", 7)
    args = SimpleNamespace(dataset="synthetic", data_dir="unused", eval_data_dir=None, synthetic_size=600,
                           image_size=None, augmentations="asymmetric", batch_size=128, seed=0, device="cpu",
                           num_workers=0, pipeline="tensor", skip_bad_images=False, overlap=False, blur_p=None)
    tensor = common.build_data(args)
    args.pipeline = "pil"
    pil = common.build_data(args)
    (xt, yt), (xp, yp) = next(iter(tensor.eval_train_loader)), next(iter(pil.eval_train_loader))
    labels = pytest.importorskip("synthetic").splits(600)["train"][1]
    assert yt.tolist() == yp.tolist() == [labels[i * 599 // 6] for i in range(7)]
    torch.testing.assert_close(xt, xp, rtol=0, atol=1e-5)
    assert len(tensor.train_loader) == len(pil.train_loader) == 4  # pretraining keeps every image


def test_tensor_pipeline_loaders_match_the_pil_pipeline_on_clean_images(tmp_path):
    """Same dataset both ways: the same number of batches, same labels, and the evaluation images
    equal to the PIL eval transform's (synthetic at its size; a 40 px folder resized to 32)."""
    args = SimpleNamespace(dataset="synthetic", data_dir="unused", eval_data_dir=None, synthetic_size=600,
                           image_size=None, augmentations="asymmetric", batch_size=128, seed=0, device="cpu",
                           num_workers=0, pipeline="tensor", skip_bad_images=False, overlap=False, blur_p=None)
    tensor = common.build_data(args)
    args.pipeline, args.image_size = "pil", None
    pil = common.build_data(args)
    assert tensor.pipeline == "tensor" and pil.pipeline == "pil"
    assert tensor.train_loader.images is tensor.eval_train_loader.images  # one copy of the training images
    assert len(tensor.train_loader) == len(pil.train_loader) == 4 and tensor.num_classes == pil.num_classes == 10
    pairs = ((tensor.eval_train_loader, pil.eval_train_loader), (tensor.eval_test_loader, pil.eval_test_loader))
    for loader_t, loader_p in pairs:
        (xt, yt), (xp, yp) = next(iter(loader_t)), next(iter(loader_p))
        assert torch.equal(yt, yp)
        torch.testing.assert_close(xt, xp, rtol=0, atol=1e-5)
    (x1, x2), labels = next(iter(tensor.train_loader))
    assert x1.shape == x2.shape == (128, 3, 32, 32) and labels.shape == (128,)

    for split in ("train", "test"):
        for c in range(2):
            os.makedirs(tmp_path / split / f"class{c}")
            for i in range(3):
                pixels = np.random.default_rng(i + 10 * c).integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / f"class{c}" / f"{i}.png")
    args = SimpleNamespace(dataset="folder", data_dir=str(tmp_path), eval_data_dir=None, synthetic_size=0,
                           image_size=32, augmentations="asymmetric", batch_size=2, seed=0, device="cpu",
                           num_workers=0, pipeline="tensor", skip_bad_images=False, overlap=False, blur_p=None)
    tensor = common.build_data(args)
    args.pipeline = "pil"
    pil = common.build_data(args)
    (xt, yt), (xp, yp) = next(iter(tensor.eval_test_loader)), next(iter(pil.eval_test_loader))
    assert torch.equal(yt, yp) and xt.shape == xp.shape == (6, 3, 32, 32)
    assert (xt - xp).abs().max() < 1.1 / 255 / 0.224  # PIL rounds its resize to uint8


def test_folder_is_decoded_once_and_cached_beside_the_data_or_in_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    expected = []
    for c in range(2):
        os.makedirs(data / "train" / f"c{c}")
        for i in range(3):
            pixels = np.random.default_rng(i + 10 * c).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / "train" / f"c{c}" / f"{i}.png")
            expected.append(pixels)
    images, labels, classes = tensor_pipeline.folder_arrays(str(data), "train")
    assert np.array_equal(images, np.stack(expected))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["c0", "c1"]
    cached = list((data / ".cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("train-uint8-")
    with mock.patch.object(tensor_pipeline, "read_image", side_effect=AssertionError("decoded again")):
        again = tensor_pipeline.folder_arrays(str(data), "train")
    assert np.array_equal(again[0], images)
    Image.fromarray(expected[0]).save(data / "train" / "c0" / "new.png")  # the folder changed: decoded anew
    assert len(tensor_pipeline.folder_arrays(str(data), "train")[0]) == 7
    # images of two sizes stay on disk: auto falls back to PIL, --pipeline tensor says why
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(data / "train" / "c1" / "odd.png")
    reason = tensor_pipeline.folder_arrays(str(data), "train")
    assert isinstance(reason, str) and "not 8x8" in reason
    source = common.dataset_source("folder", str(data))
    assert tensor_pipeline.build_data(source, "auto", "asymmetric", 2, torch.device("cpu")) is None
    with pytest.raises(SystemExit):
        tensor_pipeline.build_data(source, "tensor", "asymmetric", 2, torch.device("cpu"))
    assert capsys.readouterr().err.startswith("error: --pipeline tensor needs the dataset in memory")


def test_an_unlabelled_folder_is_decoded_once_at_any_depth_and_evaluated_on_eval_data_dir(tmp_path, monkeypatch,
                                                                                            capsys):
    """A folder without train/ (README: Your own images): its images at any depth, in torchvision's order, label -1,
    cached in DIR/.cache; the pretraining loader is theirs and, with --eval-data-dir, the eval loaders the labelled
    folder's; without it no test loader (no kNN, no probes), the clean images of the training loader theirs."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    paths = write_unlabelled_tree(str(tmp_path / "photos"))
    images, labels, classes = tensor_pipeline.folder_arrays(str(tmp_path / "photos"), "pretrain")
    assert np.array_equal(images, np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths]))
    assert labels.tolist() == [-1] * 64 and classes == []
    assert [p.name for p in (tmp_path / "photos" / ".cache").iterdir()][0].startswith("photos-uint8-")
    write_image_folder(str(tmp_path / "labelled"), classes=2, train_per_class=4, test_per_class=3)
    for eval_dir in (None, str(tmp_path / "labelled")):
        source = common.dataset_source("folder", str(tmp_path / "photos"), eval_data_dir=eval_dir)
        data = tensor_pipeline.build_data(source, "tensor", "asymmetric", 16, torch.device("cpu"))
        assert data.train_loader.images.shape == (64, 3, 32, 32) and set(data.train_loader.labels.tolist()) == {-1}
        assert not data.pretrain_labels
        if eval_dir is None:
            assert data.eval_test_loader is None and data.num_classes == 1
            assert data.eval_train_loader.images is data.train_loader.images  # one copy of the images
        else:
            assert (len(data.eval_train_loader.images), len(data.eval_test_loader.images)) == (8, 6)
            assert data.num_classes == 2
            assert data.eval_test_loader.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with mock.patch.object(tensor_pipeline, "read_image", side_effect=AssertionError("decoded again")):
        tensor_pipeline.folder_arrays(str(tmp_path / "photos"), "pretrain")


def test_folder_cache_goes_to_home_when_the_data_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    os.makedirs(data / "train" / "c0")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(data / "train" / "c0" / "a.png")
    real_makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(data)):
            raise PermissionError(path)
        return real_makedirs(path, *args, **kwargs)

    with mock.patch.object(tensor_pipeline.os, "makedirs", read_only):
        tensor_pipeline.folder_arrays(str(data), "train")
    assert not (data / ".cache").exists()
    assert len(list((tmp_path / "home" / ".cache" / "ssl-spectrum").rglob("train-uint8-*.npz"))) == 1


@pytest.mark.slow  # a learning check, like test_method_learns_on_synthetic: minutes on 2 cores
def test_tensor_pipeline_learns_as_well_as_the_pil_pipeline(tmp_path, monkeypatch):
    """INTL, same seed and budget, each pipeline: kNN far above the untrained convnet's (16.0% on
    this set, eval_linear.py --random-init) and within noise of each other (measured 53.0% tensor,
    50.0% PIL)."""
    intl = method_module("intl")
    monkeypatch.chdir(tmp_path)
    knn = {}
    for pipeline in ("tensor", "pil"):
        intl.main(intl.parse_args(["--dataset", "synthetic", "--synthetic-size", "2000", "--batch-size", "128",
                                   "--epochs", "4", "--eval-every", "100", "--num-workers", "0",
                                   "--pipeline", pipeline, "--run-name", pipeline]))
        knn[pipeline] = [json.loads(line) for line in open(f"runs/{pipeline}/metrics.jsonl")][-1]["knn_top1"]
    assert min(knn.values()) > 35 and abs(knn["tensor"] - knn["pil"]) < 8, knn


def test_more_than_two_views_or_two_sizes_are_the_pil_pipelines_with_one_line(capsys):
    """The tensor pipeline makes two views of one size: multi-crop falls back to PIL under auto, and is one line,
    exit 2, under --pipeline tensor."""
    pytest.importorskip("synthetic", reason="synthetic.py is not beside common.py")
    source = common.dataset_source("synthetic", "unused", synthetic_size=64)
    assert tensor_pipeline.build_data(source, "auto", "multicrop", 16, torch.device("cpu")) is None
    assert "--augmentations multicrop asks for 6 views; the tensor pipeline makes two of one size; using the PIL" \
        in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        tensor_pipeline.build_data(source, "tensor", "multicrop", 16, torch.device("cpu"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().endswith("; use --pipeline pil") and err.count("\n") == 1


def test_the_tensor_eval_loader_resizes_to_256_and_crops_224_like_the_pil_transform(tmp_path):
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "c0")
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (230, 260, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / "c0" / f"{i}.png")
    images = torch.from_numpy(np.stack([np.asarray(Image.open(tmp_path / "test" / "c0" / f"{i}.png"))
                                        for i in range(2)])).permute(0, 3, 1, 2)
    loader = tensor_pipeline.TensorEvalLoader(images, torch.zeros(2), 224, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    x, _ = next(iter(loader))
    clean = common.eval_transform(224, (0.5,) * 3, (0.25,) * 3)
    expected = torch.stack([clean(Image.open(tmp_path / "test" / "c0" / f"{i}.png")) for i in range(2)])
    assert x.shape == (2, 3, 224, 224) and (x - expected).abs().max() < 1.1 / 255 / 0.25  # PIL rounds to uint8
