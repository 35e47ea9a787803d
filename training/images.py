"""Reading images into uint8 [channels, height, width] arrays: one function for training and serving.

Only PIL and numpy here, so the service can use the very code training used to read its files.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode


class ImageError(ValueError):
    """An image that cannot be read as the model needs it; the message says why."""


def read_image(source: str | Path | bytes, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """Decode, convert to `channels` (1 gray, 3 RGB) and, if `size` (height, width) is given,
    resize with bilinear filtering. Returns uint8 [channels, height, width]."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = img.convert(MODES[channels])
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.array(img, dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        name = "the upload" if isinstance(source, bytes) else str(source)
        raise ImageError(f"{name} is not a readable PNG or JPEG image ({type(e).__name__})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def folder_channels(files: list[Path]) -> int:
    """1 if every image is grayscale, else 3."""
    for f in files:
        try:
            with Image.open(f) as img:
                if img.mode not in ("L", "LA", "1", "I", "I;16", "F"):
                    return 3
        except (UnidentifiedImageError, OSError):
            raise ImageError(f"{f} is not a readable PNG or JPEG image") from None
    return 1


def load_image_folder(root: str, size: int | None):
    """A folder with one sub-folder per class. Returns (X uint8 [N, C, H, W], labels, classes)."""
    base = Path(root)
    if not base.is_dir():
        raise ImageError(f"image folder not found: {root}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(f for f in (base / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
             for c in classes}
    files = {c: fs for c, fs in files.items() if fs}
    if len(files) < 2:
        raise ImageError(f"{root} needs one sub-folder per class with PNG/JPEG files in it, and at "
                         f"least two classes; found {len(files)}")
    everything = [f for fs in files.values() for f in fs]
    channels = folder_channels(everything)
    hw = (size, size) if size else None
    images = [read_image(f, channels, hw) for f in everything]
    if len({im.shape for im in images}) > 1:
        shapes = sorted({f"{im.shape[2]}x{im.shape[1]}" for im in images})
        raise ImageError(f"images in {root} have different sizes ({', '.join(shapes[:4])}); "
                         "pass --image-size N to resize them all to N x N")
    labels = [c for c, fs in files.items() for _ in fs]
    return np.stack(images), labels, list(files)


def digits_images():
    """scikit-learn's 8x8 digits (no download) as one-channel uint8 images, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return X, digits.target.tolist(), list(range(10))
