# What every method file shares: seeding, data, augmentations, backbone, optimisation, evaluation,
# checkpoints and logging. Flat on purpose; it imports nothing else from the project, so copying a
# method file plus this one into another project is enough.
import argparse
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image


def die(message):
    """End a command-line run with one readable line and exit code 2 (bad input, missing data)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id):
    # DataLoader gives each worker torch seed = base_seed + worker_id; derive python/numpy from it,
    # otherwise forked workers would share the parent's python and numpy RNG states.
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


# ----------------------------------------------------------------------------------------------
# Arguments shared by every method file (the block itself is written out in each file)
# ----------------------------------------------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
ARCHS = ("resnet18", "resnet34", "resnet50", "convnet")
AUGMENTATIONS = ("symmetric", "asymmetric", "vicreg")
# Flags a resumed run may change; every other flag comes from the checkpoint, so the run continues
# exactly as it started.
RESUME_OVERRIDABLE = ("device", "num_workers", "data_dir", "log_every")


def positive_int(text):
    """argparse type: an integer >= 1, so that a 0 ends in a usage line rather than a traceback."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def resolve_device(name):
    """'auto' -> cuda when torch sees a GPU, else cpu; a GPU asked for but absent is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name} was asked for but torch sees no GPU; use --device cpu")
    return name


def resolve_precision(precision, device):
    """'auto' -> bf16 autocast on a GPU, fp32 on the CPU (where bf16 convolutions are slow)."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def finalize_args(parser, argv, method):
    """Parse argv (None: the command line), fill the defaults that depend on other flags and check
    the combination; returns args.

    --dataset synthetic is the quick offline check, whose defaults are the convnet for 40 epochs (at
    20, learning had often not started before the learning rate decayed) and, for a method whose
    reference recipe does not learn within such a budget, the settings it names with
    parser.set_defaults(synthetic_recipe={...}); flags given on the command line still win. The warm-up,
    when not given, is the method's reference value capped at a tenth of the epochs. --resume
    takes every argument from the checkpoint except RESUME_OVERRIDABLE.
    """
    args = parser.parse_args(argv)
    if args.dataset == "synthetic":  # parsed again with the offline check's defaults
        parser.set_defaults(**{"arch": "convnet", "epochs": 40, **(parser.get_default("synthetic_recipe") or {})})
        args = parser.parse_args(argv)
    vars(args).pop("synthetic_recipe", None)
    if args.resume:
        typed = {k: v for k, v in vars(args).items() if k != "resume" and v != parser.get_default(k)}
        refused = sorted("--" + k.replace("_", "-") for k in set(typed) - set(RESUME_OVERRIDABLE))
        if refused:
            die(f"--resume continues a run with its stored arguments; only --device, --num-workers, "
                f"--data-dir and --log-every may change, not {', '.join(refused)}")
        stored = load_checkpoint(args.resume)
        if stored.get("method") != method or "args" not in stored:
            die(f"{args.resume} is not a {method}.py training checkpoint "
                f"(written by {stored.get('method', 'something else')}); resume it with that script")
        older = {"ortho": "none", "ortho_weight": 0.0, "ortho_heads": False,  # runs saved before these flags existed
                 "pipeline": "pil", "compile": False}
        args = SimpleNamespace(**{**older, **stored["args"], **typed, "resume": args.resume})
    else:
        args.arch = args.arch or "resnet18"
        args.epochs = args.epochs or 1000
        if args.warmup_epochs == parser.get_default("warmup_epochs"):  # the reference value, for short runs
            args.warmup_epochs = min(args.warmup_epochs, args.epochs // 10)
        args.eval_every = args.eval_every or max(1, args.epochs // 10)
        args.lr = args.base_lr * args.batch_size / 256  # the linear scaling rule
        if args.ortho == "none" and args.ortho_weight:
            die(f"--ortho-weight {args.ortho_weight:g} has no effect without --ortho so or --ortho srip")
        if args.ortho_weight is None:
            args.ortho_weight = ORTHO_WEIGHTS[args.ortho]
        if args.ortho_weight < 0:
            die(f"--ortho-weight must be >= 0 (a penalty), got {args.ortho_weight:g}")
        args.method = method
    args.device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, args.device)
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        die("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if args.warmup_epochs > args.epochs:
        die(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}; "
            f"pass --warmup-epochs {args.epochs // 10} or fewer")
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
# Per-channel mean and std of each training set. `folder` uses ImageNet's; `synthetic` is measured
# on the generated images.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": 32}
MEMORY_LIMIT_BYTES = 4 * 2**30  # a folder split larger than this as uint8 stays on disk (PIL pipeline)


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as a uint8 array (N, H, W, 3); yields (transform(PIL image), label)."""

    def __init__(self, images, labels, classes, transform):
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _torchvision_split(name, data_dir, split, transform):
    """One split of a torchvision dataset, downloaded into data_dir if missing."""
    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            return cls(data_dir, train=split != "test", transform=transform, download=True)
        stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
        return torchvision.datasets.STL10(data_dir, split=stl_split, transform=transform, download=True)
    except Exception as exc:  # offline: URLError, a timeout, a checksum failure...
        die(f"could not load or download {name} into {os.path.abspath(data_dir)} "
            f"({type(exc).__name__}). Offline? Put torchvision's {name} files there, or use "
            f"--dataset folder --data-dir DIR (DIR/train/<class>/*.jpg) or --dataset synthetic")


def _image_folder(data_dir, split, transform):
    """ImageFolder at DATA_DIR/train for pretrain/train, DATA_DIR/test (or val) for test."""
    candidates = ["train"] if split != "test" else ["test", "val"]
    for sub in candidates:
        path = os.path.join(data_dir, sub)
        if os.path.isdir(path):
            try:
                return torchvision.datasets.ImageFolder(path, transform=transform)
            except (FileNotFoundError, RuntimeError) as exc:
                die(f"{path} holds no images in class folders ({exc}); "
                    f"expected {path}/<class>/<image>.jpg")
    die(f"no image folder at {os.path.join(os.path.abspath(data_dir), ' or '.join(candidates))}: "
        f"--dataset folder expects DATA_DIR/train/<class>/*.jpg and DATA_DIR/test (or val)/<class>/*.jpg; "
        f"set --data-dir")


def _folder_image_size(data_dir):
    """Shorter side of the first training image; images above 64 px are trained at 224."""
    dataset = _image_folder(data_dir, "train", None)
    with Image.open(dataset.samples[0][0]) as image:
        side = min(image.size)
    return side if side <= 96 else 224


def _folder_arrays(data_dir, split):
    """A folder split decoded once into uint8 (N, H, W, 3), cached as an .npz beside the data (or in
    ~/.cache when the data is read-only) and reused while its files are unchanged. Returns
    (images, labels, classes), or a string saying why it stays on disk."""
    dataset = _image_folder(data_dir, split, None)
    stats = [(path, os.stat(path)) for path, _ in dataset.samples]
    fingerprint = hashlib.sha1("\n".join(f"{path} {st.st_size} {st.st_mtime_ns}" for path, st in stats).encode()).hexdigest()
    name = f"{os.path.basename(dataset.root)}-uint8-{fingerprint[:16]}.npz"
    beside = os.path.join(os.path.dirname(os.path.abspath(dataset.root)), ".cache")
    elsewhere = os.path.join(os.path.expanduser("~/.cache/ssl-spectrum"),
                             hashlib.sha1(os.path.abspath(dataset.root).encode()).hexdigest()[:16])
    for folder in (beside, elsewhere):
        if os.path.isfile(os.path.join(folder, name)):
            with np.load(os.path.join(folder, name)) as cached:
                return cached["images"], cached["labels"], dataset.classes
    with Image.open(dataset.samples[0][0]) as first:
        width, height = first.size
    if len(stats) * height * width * 3 > MEMORY_LIMIT_BYTES:
        return f"{dataset.root} would take more than {MEMORY_LIMIT_BYTES / 2**30:.0f} GiB as uint8"
    images = np.empty((len(stats), height, width, 3), dtype=np.uint8)
    print(f"decoding {len(stats)} images of {dataset.root} once into memory...", flush=True)
    for index, (path, _) in enumerate(dataset.samples):
        with Image.open(path) as image:
            if image.size != (width, height):
                return f"{path} is {image.size[0]}x{image.size[1]}, not {width}x{height} like the first image"
            images[index] = np.asarray(image.convert("RGB"))
    labels = np.array(dataset.targets, dtype=np.int64)
    for folder in (beside, elsewhere):
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, os.path.join(folder, name))
            print(f"cached as {os.path.join(folder, name)}")
            break
        except OSError:
            continue
    return images, labels, dataset.classes


def _torchvision_arrays(name, data_dir, split):
    """The uint8 (N, H, W, 3) array torchvision's CIFAR / STL-10 classes hold, labels, classes."""
    dataset = _torchvision_split(name, data_dir, split, None)
    if name == "stl10":  # stored (N, 3, H, W); the unlabelled images have label -1
        return dataset.data.transpose(0, 2, 3, 1), np.asarray(dataset.labels, dtype=np.int64), dataset.classes
    return dataset.data, np.asarray(dataset.targets, dtype=np.int64), dataset.classes


def dataset_source(args):
    """How to get args.dataset: a namespace with make(split, transform) -> a Dataset for split in
    pretrain/train/test (the PIL pipeline), arrays(split) -> (uint8 images (N, H, W, 3), labels,
    classes) or a string saying why the split cannot be held in memory (the tensor pipeline), the
    normalisation mean and std and the crop size."""
    if args.dataset == "synthetic":
        train_images, train_labels = make_synthetic_images(args.synthetic_size, seed=0)
        test_images, test_labels = make_synthetic_images(max(args.synthetic_size // 5, 10), seed=1)
        pixels = train_images.reshape(-1, 3) / 255.0
        mean, std = tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())
        image_size = args.image_size or NATIVE_SIZE["synthetic"]
        arrays = lambda split: ((test_images, test_labels, SYNTHETIC_CLASSES) if split == "test"  # noqa: E731
                                else (train_images, train_labels, SYNTHETIC_CLASSES))
        make = lambda split, transform: ArrayImageDataset(*arrays(split), transform)  # noqa: E731
    elif args.dataset == "folder":
        mean, std = NORMALIZATION["folder"]
        image_size = args.image_size or _folder_image_size(args.data_dir)
        make = lambda split, transform: _image_folder(args.data_dir, split, transform)  # noqa: E731
        arrays = lambda split: _folder_arrays(args.data_dir, "test" if split == "test" else "train")  # noqa: E731
    else:
        mean, std = NORMALIZATION[args.dataset]
        image_size = args.image_size or NATIVE_SIZE[args.dataset]
        make = lambda split, transform: _torchvision_split(  # noqa: E731
            args.dataset, args.data_dir, split, transform)
        arrays = lambda split: _torchvision_arrays(args.dataset, args.data_dir, split)  # noqa: E731
    load = functools.lru_cache(maxsize=None)(arrays)  # pretrain is the train split, except STL-10's: load it once
    same_split = lambda split: "train" if split == "pretrain" and args.dataset != "stl10" else split  # noqa: E731
    return SimpleNamespace(make=make, arrays=lambda split: load(same_split(split)), mean=mean, std=std,
                           image_size=image_size)


def loader_kwargs(args):
    # Workers are restarted every epoch and seeded from the loader's generator, which
    # set_data_epoch reseeds: a resumed run draws the same augmentations as an uninterrupted one.
    return dict(num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                worker_init_fn=seed_worker)


class TensorTwoViewLoader:
    """The tensor pipeline's pretraining loader: shuffled batches of uint8 images (N, 3, H, W) held
    on `device`, each turned into two views by BatchedView with its own draws, dropping the last
    partial batch. Yields ((x1, x2), labels) like the PIL path's DataLoader. `generator`, on the same
    device, draws the order and the augmentations; set_data_epoch reseeds it every epoch."""

    def __init__(self, images, labels, view1, view2, batch_size, device):
        self.images, self.labels, self.view1, self.view2 = images, labels.to(device), view1, view2
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator(device)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def __len__(self):
        return len(self.images) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=self.generator, device=self.device)
        for batch in order[:len(self) * self.batch_size].view(len(self), self.batch_size):
            images = self.images[batch]                                             # (B, 3, H, W) uint8
            x1, x2 = (view(images, self.generator).contiguous(memory_format=self.memory_format)
                      for view in (self.view1, self.view2))
            yield (x1, x2), self.labels[batch]


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
            size = self.image_size
            if (height, width) != (size, size):  # T.Resize(size) (shorter side) then T.CenterCrop(size)
                out_h, out_w = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
                whole = lambda length: torch.full((num,), length, device=x.device)  # noqa: E731
                x = resized_crop(x, whole(0), whole(0), whole(height), whole(width), (out_h, out_w))
                top, left = int(round((out_h - size) / 2)), int(round((out_w - size) / 2))
                x = x[:, :, top:top + size, left:left + size]
            yield (x - self.mean) / self.std, self.labels[start:start + self.batch_size]


def tensor_arrays(source, pipeline):
    """The three splits as arrays for --pipeline tensor/auto, or None to use the PIL pipeline."""
    if pipeline == "pil":
        return None
    splits = {split: source.arrays(split) for split in ("pretrain", "train", "test")}
    reasons = [value for value in splits.values() if isinstance(value, str)]
    if reasons and pipeline == "tensor":
        die(f"--pipeline tensor needs the dataset in memory, but {reasons[0]}; use --pipeline pil")
    if reasons:
        print(f"--pipeline auto: {reasons[0]}; using the PIL pipeline")
        return None
    return splits


def build_data(args):
    """The pretraining loader (two augmented views per image) and clean loaders for evaluation:
    the tensor pipeline (uint8 images on the training device, BatchedView) when the dataset fits in
    memory, else torchvision's PIL transforms in DataLoader workers (--pipeline).

    Returns a namespace: train_loader, eval_train_loader, eval_test_loader, num_classes, image_size,
    mean, std, pipeline.
    """
    source = dataset_source(args)
    make, mean, std, image_size = source.make, source.mean, source.std, source.image_size
    args.image_size = image_size  # stored with the run, so evaluation rebuilds the same stem
    splits = tensor_arrays(source, args.pipeline)
    args.pipeline = "pil" if splits is None else "tensor"  # stored with the run: a resume draws the same views
    if splits is not None:
        device = torch.device(args.device)
        if len(splits["pretrain"][0]) < args.batch_size:
            die(f"--batch-size {args.batch_size} is larger than the {len(splits['pretrain'][0])} training images")
        moved = {}  # one device copy per distinct array: pretrain and train are usually the same images
        for images, labels, _ in splits.values():
            if id(images) not in moved:
                moved[id(images)] = (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device),
                                     torch.as_tensor(labels))
        on_device = {split: moved[id(images)] for split, (images, _, _) in splits.items()}
        view1, view2 = (BatchedView(image_size, mean, std, **view) for view in recipe_settings(args.augmentations, image_size))
        train_loader = TensorTwoViewLoader(*on_device["pretrain"], view1, view2, args.batch_size, device)
        eval_loader = lambda split: TensorEvalLoader(*on_device[split], image_size, mean, std, device)  # noqa: E731
        megabytes = sum(images.nbytes for images, _ in moved.values()) / 2**20
        print(f"data: tensor pipeline, {len(train_loader.images)} training images as uint8 on {device} ({megabytes:.0f} MB)")
        return SimpleNamespace(train_loader=train_loader, eval_train_loader=eval_loader("train"),
                               eval_test_loader=eval_loader("test"), num_classes=len(splits["train"][2]),
                               image_size=image_size, mean=mean, std=std, pipeline="tensor")

    print(f"data: PIL pipeline, torchvision transforms in {args.num_workers} DataLoader workers")
    view1, view2 = augmentation_recipe(args.augmentations, image_size, mean, std)
    clean = eval_transform(image_size, mean, std)
    pretrain_set = make("pretrain", TwoViews(view1, view2))
    eval_train_set, eval_test_set = make("train", clean), make("test", clean)
    if len(pretrain_set) < args.batch_size:
        die(f"--batch-size {args.batch_size} is larger than the {len(pretrain_set)} training images")
    num_classes = len(eval_train_set.classes)

    generator = torch.Generator()
    generator.manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        pretrain_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator,
        **loader_kwargs(args))
    eval_loader = lambda dataset: torch.utils.data.DataLoader(  # noqa: E731  own generator: evaluation
        dataset, batch_size=512, shuffle=False, generator=torch.Generator(), **loader_kwargs(args))  # leaves the global RNG alone
    return SimpleNamespace(train_loader=train_loader, eval_train_loader=eval_loader(eval_train_set),
                           eval_test_loader=eval_loader(eval_test_set), num_classes=num_classes,
                           image_size=image_size, mean=mean, std=std, pipeline="pil")


def set_data_epoch(data, seed, epoch):
    """Reseed the shuffling so epoch e sees the same order whether or not the run was resumed."""
    data.train_loader.generator.manual_seed(seed * 100_003 + epoch)


# ----------------------------------------------------------------------------------------------
# Synthetic data: an offline, labelled image set for tests and first runs
# ----------------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
                     "concentric rings", "polka dots", "grid lines", "triangles (apex up)",
                     "zigzag stripes", "random blobs")


def _triangle_wave(t):
    """Triangle wave with period 1 and values in [-1, 1]."""
    return 4.0 * np.abs(t - np.floor(t + 0.5)) - 1.0


def make_synthetic_images(num_images, seed, image_size=32):
    """Generate a labelled 10-class texture dataset where the class lives in shape/texture.

    Every image is a two-colour pattern (random, independent foreground and background
    colours) that fills the whole frame, so the class survives heavy crops, colour jitter,
    grayscale and horizontal flips. Period, phase, small rotation, edge softness, lighting
    gradient, noise and occluding discs are random per image.
    Returns images uint8 (N, H, W, 3) and labels int64 (N,), balanced over the 10 classes.
    """
    rng = np.random.default_rng(seed)
    n, s = num_images, image_size
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)

    def u(lo, hi):  # one random value per image, broadcastable to (N, S, S)
        return rng.uniform(lo, hi, size=(n, 1, 1)).astype(np.float32)

    scale = s / 32.0
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    x, y = xx[None] - u(0, s), yy[None] - u(0, s)           # random origin = random position
    period = u(4.0, 9.0) * scale                            # texture scale in pixels
    # Base orientation per class; diagonal stripes pick +-45 deg so the class is flip-invariant.
    base = np.zeros((n, 1, 1), dtype=np.float32)
    base[labels[:, None, None] == 2] = rng.choice([-45.0, 45.0], size=(labels == 2).sum())
    theta = np.deg2rad(base + u(-12, 12))
    cu = (x * np.cos(theta) + y * np.sin(theta)) / period   # rotated coordinates, in periods
    cv = (-x * np.sin(theta) + y * np.cos(theta)) / period
    fu, fv = cu - np.floor(cu), cv - np.floor(cv)           # position inside a lattice cell

    # Signed "distance" to the pattern edge, in periods: > 0 foreground, < 0 background.
    field = np.zeros((n, s, s), dtype=np.float32)
    for c in range(10):
        i = labels == c
        u_, v_, fu_, fv_ = cu[i], cv[i], fu[i], fv[i]
        if c in (0, 2):    # horizontal / diagonal stripes
            f = 0.25 * _triangle_wave(v_)
        elif c == 1:       # vertical stripes
            f = 0.25 * _triangle_wave(u_)
        elif c == 3:       # checkerboard
            f = 0.25 * _triangle_wave(u_) * _triangle_wave(v_)
        elif c == 4:       # concentric rings around the random origin
            f = 0.25 * _triangle_wave(np.sqrt(u_ ** 2 + v_ ** 2))
        elif c == 5:       # polka dots: a disc in every lattice cell
            f = u(0.22, 0.35)[i] - np.hypot(fu_ - 0.5, fv_ - 0.5)
        elif c == 6:       # grid lines (graph paper)
            f = u(0.08, 0.15)[i] - np.minimum(np.minimum(fu_, 1 - fu_), np.minimum(fv_, 1 - fv_))
        elif c == 7:       # triangles with the apex at the top (image y grows downwards)
            f = np.minimum(0.9 - fv_, 0.5 * (fv_ - 0.1) - np.abs(fu_ - 0.5))
        elif c == 8:       # zigzag lines: horizontal stripes displaced by a triangle wave
            f = 0.25 * _triangle_wave(v_ + u(0.5, 1.0)[i] * _triangle_wave(u_ * u(0.5, 1.0)[i]))
        else:              # random blobs: low-pass filtered white noise, thresholded at zero
            k = np.fft.fftfreq(s)
            k2 = k[:, None] ** 2 + k[None, :] ** 2
            spec = np.fft.fft2(rng.standard_normal((i.sum(), s, s)))
            smooth = np.fft.ifft2(spec * np.exp(-k2 * 2 * period[i] ** 2)).real
            f = 0.15 * smooth / (smooth.std(axis=(1, 2), keepdims=True) + 1e-8)
        field[i] = f

    # Soft edges: sharpness in "per period" units; field*period is roughly a distance in pixels.
    mask = np.clip(0.5 + field * period * u(0.7, 2.0), 0.0, 1.0)[..., None]

    # Independent random colours; re-draw the foreground until its luminance differs enough,
    # so the pattern survives grayscale conversion.
    lum_w = np.array([0.299, 0.587, 0.114])
    bg = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    fg = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    bad = np.abs((fg - bg) @ lum_w) < 0.25
    while bad.any():
        fg[bad] = rng.uniform(0, 1, size=(bad.sum(), 3))
        bad = np.abs((fg - bg) @ lum_w) < 0.25
    img = bg[:, None, None, :] * (1 - mask) + fg[:, None, None, :] * mask

    # Nuisances: linear lighting gradient, a few occluding discs, pixel noise.
    grad_dir = u(0, 2 * np.pi)
    light = 1.0 + u(0, 0.5) * ((xx * np.cos(grad_dir) + yy * np.sin(grad_dir)) / s - 0.5)
    img = img * light[..., None]
    for _ in range(2):
        occ_on = rng.uniform(size=(n, 1, 1)) < 0.5
        occ = (np.hypot(xx - u(0, s), yy - u(0, s)) < u(2, 5) * scale) & occ_on
        img = np.where(occ[..., None], rng.uniform(0, 1, size=(n, 1, 1, 3)).astype(np.float32), img)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * u(0.0, 0.08)[..., None]
    images = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return images, labels


# ----------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------
def view_transform(crop_size, mean, std, crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4,
                   saturation=0.2, hue=0.1, jitter_p=0.8, gray_p=0.2, blur_p=0.0, solarize_p=0.0,
                   flip_p=0.5):
    """One augmented view of a PIL image. Each call draws its own random parameters, so every
    image in a batch gets its own crop, jitter and flip."""
    steps = [
        T.RandomResizedCrop(crop_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p),
        T.RandomGrayscale(p=gray_p),
    ]
    if blur_p > 0:  # kernel about 10% of the image side, odd; sigma as in SimCLR
        kernel_size = 2 * int(0.05 * crop_size) + 1
        steps.append(T.RandomApply([T.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
    steps += [T.RandomHorizontalFlip(p=flip_p), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class TwoViews:
    """Turns one image into the pair (view1(image), view2(image)), each with its own randomness."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, image):
        return self.view1(image), self.view2(image)


# Per-view settings of the published CIFAR configs (solo-learn). Inputs above 64 px add Gaussian
# blur: 1.0 / 0.1 for views with different probabilities, 0.5 on both views otherwise.
AUGMENTATION_RECIPES = {
    # SimCLR: strong jitter, no blur, no solarisation (solo-learn's 90.74% run)
    "symmetric": [dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)] * 2,
    # BYOL, INTL: solarisation on the second view only
    "asymmetric": [dict(solarize_p=0.0), dict(solarize_p=0.2)],
    # VICReg: milder crops, solarisation 0.1 on both views
    "vicreg": [dict(crop_scale=(0.2, 1.0), solarize_p=0.1)] * 2,
}


def recipe_settings(name, crop_size):
    """The keyword settings of each view of a named recipe, for images of crop_size pixels."""
    view1, view2 = (dict(settings) for settings in AUGMENTATION_RECIPES[name])
    if crop_size > 64:
        symmetric = view1 == view2
        view1["blur_p"], view2["blur_p"] = (0.5, 0.5) if symmetric else (1.0, 0.1)
    return view1, view2


def augmentation_recipe(name, crop_size, mean, std):
    """The two PIL view transforms of a named recipe, for images of crop_size pixels."""
    return tuple(view_transform(crop_size, mean, std, **view) for view in recipe_settings(name, crop_size))


def eval_transform(image_size, mean, std):
    """Clean images for evaluation: resize the shorter side, centre crop, normalise."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


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
            target = torch.where((which == 0)[:, None, None, None], 0.0,      # black, mean grey, grey
                                 torch.where((which == 1)[:, None, None, None], gray.mean(dim=(1, 2, 3), keepdim=True), gray))
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
        self.kernel_size = 2 * int(0.05 * crop_size) + 1
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, images, generator):
        num, _, height, width = images.shape
        coin = lambda p: torch.rand(num, generator=generator, device=generator.device) < p  # noqa: E731
        top, left, h, w = sample_crop_boxes(num, height, width, self.crop_scale, self.ratio, generator)
        x = resized_crop(images.float() / 255, top, left, h, w, self.crop_size, flip=coin(self.flip_p))
        x = color_jitter(x, sample_color_jitter(num, *self.jitter, generator))
        x = torch.where(coin(self.gray_p)[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            sigma = uniform(0.1, 2.0, num, generator)
            x = torch.where(coin(self.blur_p)[:, None, None, None], gaussian_blur(x, sigma, self.kernel_size), x)
        if self.solarize_p > 0:  # PIL inverts the pixels >= 128 of 255
            x = torch.where(coin(self.solarize_p)[:, None, None, None] & (x >= 128 / 255), 1 - x, x)
        if self.mean.device != x.device:  # moved once: a copy from host memory each call could stall the GPU queue
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------------------------
# Backbone and projection heads
# ----------------------------------------------------------------------------------------------
def small_convnet():
    """Four conv layers, 256 features. For quick CPU checks only: its accuracies say nothing
    about ResNet results."""
    def block(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 256, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_backbone(arch, image_size):
    """Returns (backbone, feature_dim). Backbone maps (B, 3, H, W) images to (B, feature_dim)."""
    if arch == "convnet":
        return small_convnet(), 256
    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:  # CIFAR stem: keep the resolution, a 7x7/2 conv and max-pool lose most of 32 px
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features  # 512 for resnet18/34, 2048 for resnet50
    net.fc = nn.Identity()
    return net, feature_dim


def projection_mlp(dims, batch_norm=True, hidden_bias=True):
    """[Linear (-BN) -ReLU] for each hidden width, then a plain Linear: dims = [in, hidden..., out]."""
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=hidden_bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------
# Orthogonality regularization (He, Du, Ma, NeurIPS 2024): SO and SRIP penalties on the weights
# ----------------------------------------------------------------------------------------------
ORTHO_KINDS = ("none", "so", "srip")
ORTHO_WEIGHTS = {"none": 0.0, "so": 1e-6, "srip": 1e-3}  # the paper's values for ResNet-18/50
SRIP_WARMUP_ITERS, SRIP_STEP_ITERS = 100, 2  # power iterations at the start, then per training step


def regularised_layers(module):
    """(name, layer) of every Conv2d and Linear in module, in definition order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weight_matrix(layer):
    """A Conv2d weight (out, in, kh, kw) as out x (in kh kw); a Linear weight (out, in) as it is."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def _layers_of(module_or_layers):
    if isinstance(module_or_layers, nn.Module):
        return [layer for _, layer in regularised_layers(module_or_layers)]
    return list(module_or_layers)


def gram_residuals(module_or_layers):
    """G - I of every regularised layer, with G on the smaller side of W (out x fan_in):
    G = W W^T if out <= fan_in, else W^T W, so G = I exactly when W is (semi-)orthogonal.
    Layers of equal weight shape share one batched matmul. Returns [(L, k, k) tensor per shape],
    in order of each shape's first layer."""
    groups = {}
    for layer in _layers_of(module_or_layers):
        groups.setdefault(tuple(layer.weight.shape), []).append(layer)
    residuals = []
    for members in groups.values():
        w = torch.stack([weight_matrix(layer) for layer in members]).float()  # (L, out, fan_in)
        if w.shape[1] > w.shape[2]:
            w = w.transpose(1, 2)                                              # (L, k, n), k = the smaller side
        gram = w @ w.transpose(1, 2)                                           # (L, k, k)
        residuals.append(gram - torch.eye(gram.shape[-1], device=gram.device))
    return residuals


def so_penalty(module_or_layers):
    """Soft Orthogonality: sum over layers of ||G - I||_F^2 (a scalar tensor with gradients)."""
    return sum((r.pow(2).sum() for r in gram_residuals(module_or_layers)), torch.zeros(()))


def srip_penalty(module_or_layers, iters=SRIP_WARMUP_ITERS, vectors=None):
    """SRIP (Bansal et al., 2018): sum over layers of sigma_max(G - I), the spectral norm of the
    symmetric residual estimated by power iteration. Each layer's unit vector v takes `iters`
    steps v <- R v / |R v| without gradient, then sigma = |R v| carries the gradient (as torch's
    spectral_norm does). vectors: None starts from random vectors; a list of (L, k, 1) tensors,
    one per weight shape (see gram_residuals), starts from them and is updated in place, so that
    a few iterations per training step track the top singular vector as the weights move."""
    residuals = gram_residuals(module_or_layers)
    if vectors is None:
        vectors = [F.normalize(torch.randn(r.shape[0], r.shape[1], 1, device=r.device), dim=1) for r in residuals]
    total = torch.zeros(())
    for r, v in zip(residuals, vectors):
        with torch.no_grad():
            for _ in range(iters):
                v.copy_(F.normalize(r @ v, dim=1))                             # (L, k, 1)
        total = total + (r @ v.clone()).norm(dim=1).sum()  # a copy: the next call updates v in place
    return total


def orthogonality_error(module_or_layers):
    """Mean over layers of ||G - I||_F: 0 for (semi-)orthogonal weights."""
    with torch.no_grad():
        norms = torch.cat([torch.linalg.matrix_norm(r) for r in gram_residuals(module_or_layers)])
    return norms.mean().item()


class OrthogonalityRegularizer(nn.Module):
    """The penalty of --ortho on the backbone's Conv2d and Linear layers (with heads=True also
    the projector's and predictor's; a BYOL target is never regularised). Calling it returns the
    penalty: SO, SRIP, or 0 for 'none'. It has no parameters; for SRIP its buffers are the
    persistent power-iteration vectors, so checkpoints carry them and a resumed run continues
    exactly. The layers are referenced, not registered: the model's state dict holds them once."""

    def __init__(self, model, kind="none", heads=False):
        super().__init__()
        parts = ["backbone"] + (["projector", "predictor"] if heads else [])
        named = [(f"{part}.{name}", layer) for part in parts if part in model
                 for name, layer in regularised_layers(model[part])]
        self.kind, self.layer_names, self.layers = kind, [name for name, _ in named], [layer for _, layer in named]
        if kind == "srip":  # own generator: the run's random stream stays that of --ortho none
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for i, r in enumerate(gram_residuals(self.layers)):
                    start = torch.randn(r.shape[0], r.shape[1], 1, generator=generator).to(r.device)
                    self.register_buffer(f"srip_vectors_{i}", F.normalize(start, dim=1))
                srip_penalty(self.layers, SRIP_WARMUP_ITERS, self.srip_vectors())  # converge on the initial weights

    def srip_vectors(self):
        return [buffer for name, buffer in self.named_buffers() if name.startswith("srip_vectors_")]

    def forward(self):
        if self.kind == "so":
            return so_penalty(self.layers)
        if self.kind == "srip":
            return srip_penalty(self.layers, SRIP_STEP_ITERS, self.srip_vectors())
        return self.layers[0].weight.new_zeros(())

    def describe(self):
        return f"{len(self.layers)} layers ({', '.join(self.layer_names)})"


# ----------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al., 2017), clipped as in NVIDIA's
    LARC. For each parameter of a group with lars=True:
        trust = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
        trust = min(trust / lr, 1)                      if clip (the step never exceeds plain SGD's)
        update = trust * (g + weight_decay * w)         (trust = 1 where ||w|| or ||g|| is 0)
        buf = momentum * buf + update;   w -= lr * buf
    Groups with lars=False (biases, norm layers) take plain SGD steps with their own weight decay.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.02,
                 clip=True, eps=1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lars=True,
                        trust_coefficient=trust_coefficient, clip=clip, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad.clone()
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    trust = group["trust_coefficient"] * w_norm / (g_norm + weight_decay * w_norm + group["eps"])
                    if group["clip"]:
                        trust = torch.clamp(trust / lr, max=1.0)
                    update.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0))  # no host sync
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-lr)


def build_optimizer(name, model, lr, weight_decay):
    """lars: biases and norm parameters (ndim <= 1) get neither weight decay nor trust scaling, as
    in solo-learn's CIFAR configs. sgd: momentum 0.9, weight decay on every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}]
    return LARS(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.02)


def warmup_cosine(step, total_steps, warmup_steps, peak, final=0.0):
    """Linear warm-up to `peak` over warmup_steps (step 0 takes peak / warmup_steps), then a cosine
    from peak to `final` at total_steps. `step` counts optimiser steps from 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def autocast(device, precision):
    """bf16/fp16 autocast for the forward pass; losses are computed in fp32 by the caller."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def prepare_model(model, args):
    """The GPU fast path: channels_last weights (with channels_last inputs, cuDNN's tensor-core
    kernels need no layout changes) and, with --compile, every backbone compiled in place (state
    dict names unchanged, so checkpoints load with or without it)."""
    if args.device.startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    if args.compile:
        for name, module in model.named_modules():
            if name.endswith("backbone"):
                module.compile()
    return model


def optimizer_step(loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone, loader, device):
    """Backbone features of every image in loader, in eval mode: (N, F) float32 and (N,) labels."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1,
                weighted=True, chunk_size=1024):
    """kNN on cosine similarity. weighted: each of the k neighbours votes exp(sim / temperature)
    for its class (InstDisc, solo-learn); otherwise a plain majority vote (ties: lowest class)."""
    train_features = F.normalize(train_features, dim=1)
    k = min(k, len(train_features))
    predictions = []
    for chunk in F.normalize(test_features, dim=1).split(chunk_size):
        similarity = chunk @ train_features.T                          # (C, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)          # (C, k)
        votes = (top_similarity / temperature).exp() if weighted else torch.ones_like(top_similarity)
        scores = torch.zeros(len(chunk), num_classes, dtype=votes.dtype, device=votes.device)
        scores.scatter_add_(1, train_labels[top_index], votes)                # (C, classes)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


def accuracy(predictions, labels):
    return (predictions == labels).float().mean().item() * 100


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes, epochs=100,
                 batch_size=256, lr=1e-3, weight_decay=1e-6, seed=0):
    """A linear classifier trained on frozen, standardised features (Adam, cosine schedule).
    Returns (top1, top5) test accuracy in %."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    classifier = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)  # a convex problem: zero init makes the probe deterministic
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    step = 0
    for _ in range(epochs):
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            set_lr(optimizer, warmup_cosine(step, epochs * steps_per_epoch, 0, lr))
            loss = F.cross_entropy(classifier(train_x[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        top5 = classifier(test_x).topk(min(5, num_classes), dim=1).indices  # (N, 5)
    top1 = accuracy(top5[:, 0], test_labels)
    return top1, (top5 == test_labels[:, None]).any(dim=1).float().mean().item() * 100


def effective_rank(spectrum):
    """exp of the entropy of a spectrum normalised to sum 1 (Roy & Vetterli 2007; RankMe):
    k equal values give k, one non-zero value gives 1."""
    p = spectrum.double().clamp(min=0)
    p = p / p.sum()
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return entropy.exp().item()


# Spectra, to see dimensional collapse: sorted singular values of the weights and eigenvalues of
# feature covariances, as in the OR paper's figures. effective_rank() above summarises each.
def weight_spectra(named_layers):
    """{name: singular values of its weight matrix, descending} for (name, layer) pairs."""
    with torch.no_grad():
        return {name: torch.linalg.svdvals(weight_matrix(layer).double()) for name, layer in named_layers}


def covariance_eigenvalues(x):
    """Eigenvalues of the covariance of the rows of x (N, D), in float64, descending."""
    x = x.double()
    x = x - x.mean(dim=0)
    return torch.linalg.eigvalsh(x.T @ x / (len(x) - 1)).flip(0).clamp(min=0)


def feature_stages(backbone):
    """(name, module, which) to hook: a ResNet's input to layer1 (after the stem) and the output of
    each stage; the convnet's output of each ReLU block."""
    if hasattr(backbone, "layer1"):
        stages = [("stem", backbone.layer1, "input")]
        return stages + [(f"layer{i}", getattr(backbone, f"layer{i}"), "output") for i in range(1, 5)]
    relus = [m for m in backbone if isinstance(m, nn.ReLU)]
    return [(f"block{i + 1}", m, "output") for i, m in enumerate(relus)]


@torch.no_grad()
def feature_spectra(backbone, projector, images, batch_size=256):
    """{stage: covariance eigenvalues} of features of images (N, 3, H, W), in eval mode: every
    stage of the backbone (channels averaged over space, (N, C)), the representation and the
    projector output."""
    captured = {}

    def hook(name, which):
        def record(module, inputs, output):
            x = inputs[0] if which == "input" else output
            captured.setdefault(name, []).append(x.float().mean(dim=(2, 3)).cpu())  # (B, C)
        return record

    handles = [m.register_forward_hook(hook(name, which)) for name, m, which in feature_stages(backbone)]
    backbone.eval(), projector.eval()
    rep, proj = [], []
    try:
        for batch in images.split(batch_size):
            h = backbone(batch)
            rep.append(h.float().cpu())
            proj.append(projector(h).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    features = {name: torch.cat(chunks) for name, chunks in captured.items()}
    features.update(representation=torch.cat(rep), projector=torch.cat(proj))
    return {name: covariance_eigenvalues(x) for name, x in features.items()}


def embedding_stats(z):
    """Collapse diagnostics of embeddings z (N, D). erank: RankMe (Garrido et al., 2023), the
    effective rank of z's singular values. std: the mean per-dimension std of the L2-normalised
    rows times sqrt(D), about 1 when spread over the sphere and 0 when collapsed to a point
    (SimSiam's diagnostic)."""
    z = z.double()
    std = F.normalize(z, dim=1).std(dim=0).mean().item() * math.sqrt(z.shape[1])
    return {"erank": effective_rank(torch.linalg.svdvals(z)), "std": std}


def evaluate(model, data, device, linear=False):
    """kNN (k=200 weighted, and 5-NN) on clean features, collapse diagnostics of the representation
    and of the projector output, the mean orthogonality error of the regularised layers (the
    backbone's when the model has no regularizer), and optionally the linear probe."""
    train_features, train_labels = extract_features(model["backbone"], data.eval_train_loader, device)
    test_features, test_labels = extract_features(model["backbone"], data.eval_test_loader, device)
    knn = lambda **kw: accuracy(knn_predict(  # noqa: E731
        train_features, train_labels, test_features, data.num_classes, **kw), test_labels)
    results = {"knn_top1": knn(k=200, temperature=0.1), "knn5_top1": knn(k=5, weighted=False)}
    projector, was_training = model["projector"], model["projector"].training
    with torch.no_grad():  # projector output of the cached clean features, (N, D)
        z = torch.cat([projector.eval()(h.to(device)).float().cpu() for h in train_features.split(4096)])
    projector.train(was_training)
    for name, values in (("rep", train_features), ("proj", z)):
        stats = embedding_stats(values)
        results[f"{name}_erank"], results[f"{name}_std"] = stats["erank"], stats["std"]
    layers = model["ortho"].layers if "ortho" in model else model["backbone"]
    results["ortho_error"] = orthogonality_error(layers)
    if linear:
        results["linear_top1"], results["linear_top5"] = linear_probe(
            train_features, train_labels, test_features, test_labels, data.num_classes)
    return results


# ----------------------------------------------------------------------------------------------
# Checkpoints and logging
# ----------------------------------------------------------------------------------------------
def prepare_run_dir(args):
    """runs/<run_name>/ with args.json; a resumed run keeps writing into its own folder."""
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.run_name or f"{args.method}-{args.dataset}-{args.arch}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(args.out_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({**vars(args), "command": " ".join(sys.argv)}, f, indent=2)
    return run_dir


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, scaler, epoch, global_step, args):
    """Everything needed to continue: epoch counts completed epochs."""
    atomic_save({"method": args.method, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step,
                 "args": vars(args), "rng": rng_states()}, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        die(f"could not read {path}: it is corrupt or not a checkpoint of this project ({type(exc).__name__})")
    if not isinstance(state, dict):
        die(f"{path} is not a checkpoint of this project")
    return state


def resume(path, model, optimizer, scaler):
    """Restore a run in place; returns (completed epochs, global step)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    print(f"resumed {path} at epoch {state['epoch']}, step {state['global_step']}")
    return state["epoch"], state["global_step"]


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RunLogger:
    """Progress lines on stdout and one JSON line per record in run_dir/metrics.jsonl.

    train_step is called every optimiser step but only reads the loss terms (a host sync) every
    log_every steps; images/s and the ETA are measured over that window, not the whole run.
    """

    def __init__(self, run_dir, args, steps_per_epoch):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.args, self.steps_per_epoch = args, steps_per_epoch
        self.total_steps = args.epochs * steps_per_epoch
        self.window_start, self.window_steps = time.perf_counter(), 0

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def due(self, global_step):
        """Whether train_step(global_step) will log: every log_every steps and at the last step."""
        return global_step % self.args.log_every == 0 or global_step == self.total_steps

    def train_step(self, epoch, global_step, terms, lr):
        self.window_steps += 1
        if not self.due(global_step):
            return
        values = {name: float(value.detach() if torch.is_tensor(value) else value) for name, value in terms.items()}  # tensors: a host sync, once a window
        if not all(math.isfinite(v) for v in values.values()):
            die(f"loss is {values} at step {global_step} (epoch {epoch + 1}): training diverged. "
                f"Lower --base-lr or use --precision fp32; the last epoch's checkpoint is kept")
        elapsed = time.perf_counter() - self.window_start
        images_per_s = self.window_steps * self.args.batch_size / elapsed
        eta = (self.total_steps - global_step) * elapsed / self.window_steps
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.write({"type": "train", "epoch": epoch + 1, "step": global_step, **values, "lr": lr,
                    "images_per_s": images_per_s})
        in_epoch = global_step - epoch * self.steps_per_epoch
        terms_text = " ".join(f"{name} {value:.4f}" for name, value in values.items())
        print(f"epoch {epoch + 1}/{self.args.epochs} step {in_epoch}/{self.steps_per_epoch} | {terms_text} | "
              f"lr {lr:.3g} | {images_per_s:.0f} img/s | eta {format_duration(eta)}", flush=True)

    def evaluation(self, epoch, global_step, results):
        self.write({"type": "eval", "epoch": epoch + 1, "step": global_step, **results})
        print(f"eval epoch {epoch + 1}: " + " | ".join(f"{k} {v:.2f}" for k, v in results.items()), flush=True)

    def exclude(self, seconds):
        """Leave time spent outside training steps (evaluation, checkpoints) out of images/s."""
        self.window_start += seconds


def end_of_epoch(run_dir, model, optimizer, scaler, epoch, global_step, args, data, device, log):
    """Checkpoint (and after the last epoch backbone.pt), then evaluate every --eval-every epochs
    and at the end, with the linear probe at the end. Returns the evaluation, or None."""
    started, last, results = time.perf_counter(), epoch + 1 == args.epochs, None
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), model, optimizer, scaler, epoch + 1, global_step, args)
    if last:
        atomic_save(model["backbone"].state_dict(), os.path.join(run_dir, "backbone.pt"))
    if (epoch + 1) % args.eval_every == 0 or last:
        results = evaluate(model, data, device, linear=last)
        log.evaluation(epoch, global_step, results)
    if last:
        print(f"done: {run_dir}/checkpoint.pt, backbone.pt, metrics.jsonl")
    log.exclude(time.perf_counter() - started)
    return results
