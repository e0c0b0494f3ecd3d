# The offline data set: a labelled 10-class texture set generated in NumPy, for tests and first runs
# on a machine without a download (--dataset synthetic). Optional beside common.py.
import numpy as np
import torch
from PIL import Image

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


def splits(train_size):
    """{"train", "pretrain", "test": (uint8 images (N, 32, 32, 3), labels, classes)}: train_size
    training images (seed 0), and a test set of a fifth of that (seed 1, at least 10)."""
    train = (*make_synthetic_images(train_size, seed=0), SYNTHETIC_CLASSES)
    test = (*make_synthetic_images(max(train_size // 5, 10), seed=1), SYNTHETIC_CLASSES)
    return {"pretrain": train, "train": train, "test": test}


def normalization(images):
    """Per-channel mean and std of uint8 images (N, H, W, 3), in [0, 1] units."""
    pixels = images.reshape(-1, 3) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as a uint8 array (N, H, W, 3); yields (transform(PIL image), label)."""

    def __init__(self, images, labels, classes, transform):
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])
