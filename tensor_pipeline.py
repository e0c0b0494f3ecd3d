# The tensor pipeline: the augmentation recipes of common.py applied to whole batches of images held
# in memory (on the GPU when training on one), with every image's own random parameters. A speed
# twin of torchvision's PIL transforms, tested against them op by op (test_methods.py); optional:
# without this file beside common.py, every method trains with the PIL pipeline.
import contextlib
import hashlib
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from common import (EVAL_TRAIN_IMAGES, Data, blur_kernel_size, die, eval_size, evenly_spaced, first_image_size,
                    image_folder, left_out, read_image, recipe_settings)

MEMORY_LIMIT_BYTES = 4 * 2**30  # a folder split larger than this as uint8 stays on disk (PIL pipeline)


# ----------------------------------------------------------------------------------------------
# Batched augmentations: the same recipes on tensors, with every image's own random parameters
# ----------------------------------------------------------------------------------------------
# torchvision's transforms draw one set of parameters per call, so on a batch every image would get
# the same crop and colours (wrong for SSL). BatchedView draws them per image, on the images'
# device, without host syncs. Images are float (B, 3, H, W) in [0, 1] between the steps.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def uniform(low, high, size, generator):
    """Uniform draws in [low, high) on the generator's device; low and high may be tensors."""
    return low + (high - low) * torch.rand(size, generator=generator, device=generator.device)


def sample_crop_boxes(num, height, width, scale, ratio, generator):
    """RandomResizedCrop.get_params for `num` images at once; returns (top, left, h, w), each (num,).
    As torchvision: up to 10 tries of an area fraction uniform in `scale` and an aspect ratio
    log-uniform in `ratio`; the first box that fits is placed uniformly; if none fits, the central
    crop with the aspect ratio clamped to `ratio`. All 10 tries are drawn at once (same law)."""
    tries = 10
    area = height * width * uniform(scale[0], scale[1], (num, tries), generator)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), (num, tries), generator))
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # (num, tries)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits (0 if none)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    if width / height < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
    top = torch.where(found, torch.floor(uniform(0, height - h + 1, num, generator)), (height - fallback_h) // 2)
    left = torch.where(found, torch.floor(uniform(0, width - w + 1, num, generator)), (width - fallback_w) // 2)
    return top.long(), left.long(), h.long(), w.long()


def bicubic_resize_matrix(start, length, in_size, out_size):
    """(B, out_size, in_size) weights that resample pixels [start, start + length) of one image axis
    to out_size pixels, per image: PIL's bicubic filter (a = -0.5), widened by the scale factor when
    shrinking (antialias), each row normalised to sum 1; the PIL path's resize, written as a matrix."""
    scale = (length.float() / out_size)[:, None, None]                                  # (B, 1, 1)
    centre = start[:, None, None] + (torch.arange(out_size, device=start.device) + 0.5)[:, None] * scale
    pixel = torch.arange(in_size, device=start.device) + 0.5                           # (in_size,)
    t = (pixel - centre).abs() / scale.clamp(min=1)                                     # (B, out, in)
    a = -0.5
    weights = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                          torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))
    inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])  # only the crop
    weights = weights * inside
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop(images, top, left, h, w, size, flip=None):
    """Crop each image to its own box and resize it to size (an int for square, or (height, width))
    with the bicubic matrices, an optional per-image horizontal flip folded into the column weights.
    As PIL: columns first, clipped to [0, 1] before the rows (PIL's uint8 clips bicubic overshoot
    between its two passes; without this, high-contrast edges differ by ~14 of 255 levels).
    (B, 3, H, W) -> (B, 3, out_h, out_w)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows = bicubic_resize_matrix(top, h, images.shape[2], out_h)                      # (B, out_h, H)
    cols = bicubic_resize_matrix(left, w, images.shape[3], out_w)                     # (B, out_w, W)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    x = (images @ cols[:, None].transpose(2, 3)).clamp(0, 1)                         # (B, 3, H, out_w)
    return (rows[:, None] @ x).clamp(0, 1)


def grayscale(images):
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(images, target, factor):
    """factor * images + (1 - factor) * target, clipped to [0, 1]; factor (B,). Brightness blends
    with black, contrast with the image's mean grey, saturation with its own grey (torchvision)."""
    return torch.lerp(target, images, factor[:, None, None, None]).clamp_(0, 1)


def rgb_to_hsv(images):
    """(B, 3, H, W) RGB -> hue, saturation, value, each (B, H, W) in [0, 1]."""
    r, g, b = images.unbind(1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    saturation = chroma / value.clamp(min=1e-12)
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    return torch.where(chroma > 0, hue, 0.0), saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Inverse of rgb_to_hsv: channel n in (5, 3, 1) for (R, G, B) is V - V S clip(min(k, 4 - k), 0, 1)
    with k = (n + 6 H) mod 6."""
    channels = [value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)
                for k in ((n + 6 * hue) % 6 for n in (5, 3, 1))]
    return torch.stack(channels, dim=1)


def adjust_hue(images, shift):
    """Rotate the hue by shift (B,) turns, in HSV as torchvision."""
    hue, saturation, value = rgb_to_hsv(images)
    return hsv_to_rgb((hue + shift[:, None, None]) % 1.0, saturation, value)


def sample_color_jitter(num, brightness, contrast, saturation, hue, p, generator):
    """torchvision's ColorJitter parameters for `num` images, applied with probability p: factors
    uniform in [1 - x, 1 + x] (hue shift in [-x, x]) and the four adjustments in a uniformly random
    order, drawn as a random position for the hue among a random order of the three blends. Images
    left alone get identity factors. Returns factors (B, 3) of brightness, contrast, saturation,
    hue_shift (B,), blend_order (B, 3) with 0 brightness / 1 contrast / 2 saturation, hue_position (B,)."""
    apply = uniform(0, 1, num, generator) < p
    factors = torch.stack([uniform(max(0.0, 1 - x), 1 + x, num, generator)
                           for x in (brightness, contrast, saturation)], dim=1)
    return SimpleNamespace(
        factors=torch.where(apply[:, None], factors, 1.0),
        hue_shift=torch.where(apply, uniform(-hue, hue, num, generator), 0.0),
        blend_order=uniform(0, 1, (num, 3), generator).argsort(dim=1),
        hue_position=torch.randint(0, 4, (num,), generator=generator, device=generator.device))


def color_jitter(images, jitter):
    """Apply sample_color_jitter's draws: the blends placed before the hue, the hue, then the blends
    after it (each image its own order; the costly hue runs once for the whole batch)."""
    def blends(images, before_hue):
        for slot in range(3):
            which = jitter.blend_order[:, slot]                                # (B,) 0, 1 or 2
            active = (slot < jitter.hue_position) == before_hue
            factor = torch.where(active, jitter.factors.gather(1, which[:, None])[:, 0], 1.0)
            gray = grayscale(images)                                           # (B, 1, H, W)
            target = torch.where(
                (which == 0)[:, None, None, None],
                0.0,  # black, mean grey, grey
                torch.where((which == 1)[:, None, None, None], gray.mean(dim=(1, 2, 3), keepdim=True), gray),
            )
            images = blend(images, target, factor)
        return images

    images = blends(images, before_hue=True)
    images = adjust_hue(images, jitter.hue_shift)
    return blends(images, before_hue=False)


def gaussian_blur(images, sigma, kernel_size):
    """Blur each image with its own sigma (B,): a separable Gaussian of kernel_size taps with
    reflect padding, as torchvision's gaussian_blur."""
    num, channels, height, width = images.shape
    half = kernel_size // 2
    x = torch.linspace(-half, half, kernel_size, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*3, K)
    flat = F.pad(images.reshape(1, num * channels, height, width), [half] * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=num * channels)               # along rows
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=num * channels)               # along columns
    return flat.reshape(num, channels, height, width)


class BatchedView:
    """One augmented view of a batch of uint8 images (B, 3, H, W) -> normalised float (B, 3, S, S):
    view_transform's steps, in its order, with the same settings, each image with its own draws."""

    def __init__(self, crop_size, mean, std, crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1, jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0,
                 flip_p=0.5):
        self.crop_size, self.crop_scale, self.ratio = crop_size, crop_scale, (3 / 4, 4 / 3)
        self.jitter = (brightness, contrast, saturation, hue, jitter_p)
        self.gray_p, self.blur_p, self.solarize_p, self.flip_p = gray_p, blur_p, solarize_p, flip_p
        self.kernel_size = blur_kernel_size(crop_size)
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def sample(self, num, height, width, generator):
        """Every random parameter of `num` images of height x width, drawn in this order on the generator's
        device: crop boxes, flips, colour jitter, grayscale, blur (sigma, then whether), solarisation."""
        coin = lambda p: torch.rand(num, generator=generator, device=generator.device) < p  # noqa: E731
        top, left, h, w = sample_crop_boxes(num, height, width, self.crop_scale, self.ratio, generator)
        draws = SimpleNamespace(top=top, left=left, h=h, w=w, flip=coin(self.flip_p),
                                jitter=sample_color_jitter(num, *self.jitter, generator), gray=coin(self.gray_p))
        if self.blur_p > 0:
            draws.sigma, draws.blur = uniform(0.1, 2.0, num, generator), coin(self.blur_p)
        if self.solarize_p > 0:
            draws.solarize = coin(self.solarize_p)
        return draws

    def apply(self, images, draws):
        """The view of uint8 images (b, 3, H, W) with their draws (b of each): normalised float (b, 3, S, S)."""
        x = resized_crop(images.float() / 255, draws.top, draws.left, draws.h, draws.w, self.crop_size, draws.flip)
        x = color_jitter(x, draws.jitter)
        x = torch.where(draws.gray[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            x = torch.where(draws.blur[:, None, None, None], gaussian_blur(x, draws.sigma, self.kernel_size), x)
        if self.solarize_p > 0:  # PIL inverts the pixels >= 128 of 255
            x = torch.where(draws.solarize[:, None, None, None] & (x >= 128 / 255), 1 - x, x)
        if self.mean.device != x.device:  # moved once: a copy from host memory each call could stall the GPU queue
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std

    def __call__(self, images, generator, start=0, num=None):
        """images: (b, 3, H, W), images [start, start + b) of a global batch of num (default b) images. The
        parameters of all num images are drawn, the same in every process, and those of the slice applied
        (torchrun: each process augments its own share, with the draws one process would give it)."""
        draws = self.sample(num or len(images), images.shape[2], images.shape[3], generator)
        return self.apply(images, slice_draws(draws, slice(start, start + len(images))))


def slice_draws(draws, part):
    """The draws of images `part` (a slice) of the batch."""
    return SimpleNamespace(**{name: slice_draws(value, part) if isinstance(value, SimpleNamespace) else value[part]
                              for name, value in vars(draws).items()})


# ----------------------------------------------------------------------------------------------
# Loaders over images held in memory
# ----------------------------------------------------------------------------------------------
class TensorTwoViewLoader:
    """The tensor pipeline's pretraining loader: shuffled batches of uint8 images (N, 3, H, W) held
    on `device`, each turned into two views by BatchedView with its own draws, dropping the last
    partial batch. Yields ((x1, x2), labels) like the PIL path's DataLoader. `generator`, on the same
    device, draws the order and the augmentations; set_data_epoch reseeds it every epoch. With torchrun,
    process `rank` of world_size yields its slice of every global batch of batch_size, the same draws."""

    def __init__(self, images, labels, view1, view2, batch_size, device, rank=0, world_size=1, overlap=False):
        self.images, self.labels, self.view1, self.view2 = images, labels.to(device), view1, view2
        self.batch_size, self.device, self.overlap = batch_size, device, overlap
        self.share = batch_size // world_size
        self.start = rank * self.share
        self.generator = torch.Generator(device)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.side_stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def __len__(self):
        return len(self.images) // self.batch_size

    def __iter__(self):
        """With overlap (--overlap), batch k + 1 is augmented before batch k is handed over: on a GPU, on a side
        stream, so that its kernels run beside step k's. The batches are the same either way (one generator)."""
        if not self.overlap:
            yield from self.batches()
            return
        batches, main_stream = self.batches(), torch.cuda.current_stream(self.device) if self.side_stream else None
        if self.side_stream:  # after what the main stream wrote before (the images, labels and generator seed)
            self.side_stream.wait_stream(main_stream)

        def augment_next():
            with torch.cuda.stream(self.side_stream) if self.side_stream else contextlib.nullcontext():
                return next(batches, None)
        ahead = augment_next()
        while ahead is not None:
            if self.side_stream:  # the step waits for the batch, and its memory stays the step's until it ends
                main_stream.wait_stream(self.side_stream)
                for tensor in (*ahead[0], ahead[1]):
                    tensor.record_stream(main_stream)
            batch, ahead = ahead, augment_next()
            yield batch

    def batches(self):
        order = torch.randperm(len(self.images), generator=self.generator, device=self.device)
        for batch in order[:len(self) * self.batch_size].view(len(self), self.batch_size):
            mine = batch[self.start:self.start + self.share]                       # this process's slice
            images = self.images[mine]                                              # (B / N, 3, H, W) uint8
            x1, x2 = (view(images, self.generator, self.start, self.batch_size).contiguous(
                      memory_format=self.memory_format) for view in (self.view1, self.view2))
            yield (x1, x2), self.labels[mine]


class TensorEvalLoader:
    """Clean, normalised batches of in-memory uint8 images, in order: eval_transform on tensors."""

    def __init__(self, images, labels, image_size, mean, std, device, batch_size=512):
        self.images, self.labels, self.image_size, self.batch_size = images, labels, image_size, batch_size
        self.mean = torch.tensor(mean, device=device)[:, None, None]
        self.std = torch.tensor(std, device=device)[:, None, None]

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start:start + self.batch_size].float() / 255                 # (B, 3, H, W)
            num, _, height, width = x.shape
            size, resize = self.image_size, eval_size(self.image_size)
            if (height, width) != (size, size) or resize != size:  # T.Resize(resize) (shorter side), T.CenterCrop(size)
                wide = height <= width
                out_h, out_w = (resize, int(resize * width / height)) if wide else (int(resize * height / width),
                                                                                    resize)
                whole = lambda length: torch.full((num,), length, device=x.device)  # noqa: E731
                x = resized_crop(x, whole(0), whole(0), whole(height), whole(width), (out_h, out_w))
                top, left = int(round((out_h - size) / 2)), int(round((out_w - size) / 2))
                x = x[:, :, top:top + size, left:left + size]
            yield (x - self.mean) / self.std, self.labels[start:start + self.batch_size]


def folder_arrays(data_dir, split, skip_bad=False):
    """A folder split (common.image_folder: a folder without train/ is its images at any depth, label -1, no
    classes) decoded once into uint8 (N, H, W, 3), cached as an .npz in DATA_DIR/.cache (or in ~/.cache when
    the data is read-only) and reused while its files are unchanged. Unreadable images end the run in one
    line listing them, or with skip_bad are left out. Returns (images, labels, classes), or a string saying
    why it stays on disk."""
    dataset = image_folder(data_dir, split, None)
    stats = [(path, os.stat(path)) for path, _ in dataset.samples]
    fingerprint = hashlib.sha1("\n".join(f"{path} {st.st_size} {st.st_mtime_ns}" for path,
                                         st in stats).encode()).hexdigest()
    name = f"{os.path.basename(dataset.root)}-uint8-{fingerprint[:16]}.npz"
    beside = os.path.join(os.path.abspath(data_dir), ".cache")
    elsewhere = os.path.join(os.path.expanduser("~/.cache/ssl-spectrum"),
                             hashlib.sha1(os.path.abspath(dataset.root).encode()).hexdigest()[:16])
    for folder in (beside, elsewhere):
        if os.path.isfile(os.path.join(folder, name)):
            with np.load(os.path.join(folder, name)) as cached:
                return checked(cached["images"], cached["labels"], list(cached["bad"]) if "bad" in cached else [],
                               dataset, skip_bad)
    width, height = first_image_size(dataset)
    if len(stats) * height * width * 3 > MEMORY_LIMIT_BYTES:
        return f"{dataset.root} would take more than {MEMORY_LIMIT_BYTES / 2**30:.0f} GiB as uint8"
    images = np.empty((len(stats), height, width, 3), dtype=np.uint8)
    print(f"decoding {len(stats)} images of {dataset.root} once into memory...", flush=True)
    bad = []
    for index, (path, _) in enumerate(dataset.samples):
        pixels = read_image(path)  # None: unreadable
        if pixels is not None and pixels.shape != (height, width, 3):
            return f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, not {width}x{height} like the first image"
        if pixels is None:
            bad.append(path)
        else:
            images[index] = pixels
    labels = np.array(dataset.targets, dtype=np.int64)
    if bad:
        good = np.isin([path for path, _ in dataset.samples], bad, invert=True)
        images, labels = images[good], labels[good]
    for folder in (beside, elsewhere):
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp.npz")
        try:
            os.makedirs(folder, exist_ok=True)
            np.savez(tmp, images=images, labels=labels, bad=np.array(bad, dtype=str))
            os.replace(tmp, os.path.join(folder, name))
            print(f"cached as {os.path.join(folder, name)}")
            break
        except OSError as exc:  # the cache only saves time: say why, leave no temporary file, carry on
            with contextlib.suppress(OSError):
                os.remove(tmp)
            print(f"could not cache the decoded images in {folder}: {exc.strerror or exc}", flush=True)
    return checked(images, labels, bad, dataset, skip_bad)


def checked(images, labels, bad, dataset, skip_bad):
    """(images, labels, classes) of the readable images; unreadable ones end the run unless skip_bad."""
    left_out(bad, dataset.root, skip_bad)
    return images, labels, dataset.classes


def split_arrays(source, split):
    """One split of common.dataset_source(...) as (uint8 images (N, H, W, 3), labels, classes), or a
    string saying why it cannot be held in memory. A folder's train and test splits are its eval_dir's."""
    if source.name == "folder":
        return folder_arrays(source.data_dir if split == "pretrain" else source.eval_dir, split, source.skip_bad_images)
    dataset = source.make(split, None)
    if source.name == "synthetic":
        return dataset.images, dataset.labels, dataset.classes
    if source.name == "stl10":  # stored (N, 3, H, W); the unlabelled images have label -1
        return dataset.data.transpose(0, 2, 3, 1), np.asarray(dataset.labels, dtype=np.int64), dataset.classes
    return dataset.data, np.asarray(dataset.targets, dtype=np.int64), dataset.classes


def build_data(source, pipeline, augmentations, batch_size, device, rank=0, world_size=1, overlap=False,
               blur_p=None):
    """common.Data with the tensor pipeline's loaders, or None when the dataset does not fit in
    memory and pipeline is 'auto' (the caller then uses the PIL pipeline). augmentations and blur_p: the
    recipe, as common.recipe_settings takes it; rank, world_size: torchrun's; overlap: augment the next
    batch while the step runs (TensorTwoViewLoader)."""
    size, mean, std = source.image_size, source.mean, source.std
    views = recipe_settings(augmentations, size, blur_p)
    if len(views) != 2 or views[0]["crop_size"] != views[1]["crop_size"]:
        why = f"--augmentations {augmentations} asks for {len(views)} views; the tensor pipeline makes two of one size"
        if pipeline == "tensor":
            die(f"{why}; use --pipeline pil")
        print(f"--pipeline auto: {why}; using the PIL pipeline")
        return None
    splits = {}
    for split in ("train", "test", "pretrain"):  # pretrain is the train split, except STL-10's (train + unlabeled)
        same = split == "pretrain" and source.name != "stl10" and source.eval_dir == source.data_dir  # --eval-data-dir
        if split == "test" and not splits["train"][2]:  # evaluation images without labels: no kNN, no probes
            splits[split] = None
            continue
        splits[split] = splits["train"] if same else split_arrays(source, split)
        if isinstance(splits[split], str) and pipeline == "tensor":
            die(f"--pipeline tensor needs the dataset in memory, but {splits[split]}; use --pipeline pil")
        if isinstance(splits[split], str):
            print(f"--pipeline auto: {splits[split]}; using the PIL pipeline")
            return None
    if len(splits["pretrain"][0]) < batch_size:
        die(f"--batch-size {batch_size} is larger than the {len(splits['pretrain'][0])} training images")
    moved = {}  # one device copy per distinct array: pretrain and train are usually the same images
    for images, labels, _ in filter(None, splits.values()):
        if id(images) not in moved:
            moved[id(images)] = (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device),
                                 torch.as_tensor(labels))
    on_device = {split: moved[id(arrays[0])] for split, arrays in splits.items() if arrays}
    view1, view2 = (BatchedView(mean=mean, std=std, **view) for view in views)
    train_loader = TensorTwoViewLoader(*on_device["pretrain"], view1, view2, batch_size, device, rank, world_size,
                                       overlap)
    images, labels = on_device["train"]
    if len(images) > EVAL_TRAIN_IMAGES:  # kNN and the probes learn from at most EVAL_TRAIN_IMAGES, as the PIL pipeline
        spaced = torch.from_numpy(evenly_spaced(len(images), EVAL_TRAIN_IMAGES))
        on_device["train"] = (images[spaced.to(device)], labels[spaced])
    eval_loader = lambda split: TensorEvalLoader(*on_device[split], size, mean, std, device)  # noqa: E731
    megabytes = sum(images.nbytes for images, _ in moved.values()) / 2**20
    print(
        f"data: tensor pipeline, {len(train_loader.images)} training images as uint8 on {device} ({megabytes:.0f} MB)"
    )
    return Data(train_loader, eval_loader("train"), eval_loader("test") if splits["test"] else None,
                len(splits["train"][2]) or 1, size, mean, std, "tensor", bool(splits["pretrain"][2]))  # 1: no labels
