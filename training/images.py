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


def fitted(img: Image.Image, size: tuple[int, int], fit: str) -> Image.Image:
    """`img` at `size` (height, width). "crop" (square sizes): the shorter side scaled to the size,
    then the centre cut out, as torchvision's Resize(side) then CenterCrop(side) do it;
    "stretch": resized to the size (models trained before crop became the way)."""
    h, w = size
    if fit == "stretch":
        return img.resize((w, h), Image.Resampling.BILINEAR)
    if img.width <= img.height:  # torchvision's rounding of the longer side: down
        scaled = (w, int(w * img.height / img.width))
    else:
        scaled = (int(h * img.width / img.height), h)
    if scaled != img.size:
        img = img.resize(scaled, Image.Resampling.BILINEAR)
    top, left = int(round((img.height - h) / 2)), int(round((img.width - w) / 2))
    return img.crop((left, top, left + w, top + h))


def read_image(source: str | Path | bytes, channels: int, size: tuple[int, int] | None,
               fit: str = "crop") -> np.ndarray:
    """Decode, convert to `channels` (1 gray, 3 RGB) and, if `size` (height, width) is given and
    differs, bring it to that size (`fitted`). Returns uint8 [channels, height, width]."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img = img.convert(MODES[channels])
            if size is not None and img.size != (size[1], size[0]):
                img = fitted(img, size, fit)
            array = np.array(img, dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        name = "the upload" if isinstance(source, bytes) else str(source)
        raise ImageError(f"{name} is not a readable PNG or JPEG image ({type(e).__name__})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F")
MAX_AUTO_SIZE = 224  # images of different sizes: the median shorter side, at most this


def survey(files: list[Path]) -> tuple[dict[Path, tuple[int, int]], dict[Path, str], list[Path]]:
    """Each file's (height, width) and mode from its header alone (nothing decoded), and the files
    that are not images."""
    sizes, modes, broken = {}, {}, []
    for f in files:
        try:
            with Image.open(f) as img:
                sizes[f], modes[f] = (img.height, img.width), img.mode
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            broken.append(f)
    return sizes, modes, broken


def typical_size(sizes) -> int:
    """The side of the square images of different sizes are brought to."""
    return int(min(np.median([min(hw) for hw in sizes]), MAX_AUTO_SIZE))


def image_files(root: str) -> dict[str, list[Path]]:
    """A folder's images per class (one sub-folder each): PNG/JPEG files, hidden files and folders
    left out."""
    base = Path(root)
    if not base.is_dir():
        raise ImageError(f"image folder not found: {root}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(f for f in (base / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in f.relative_to(base / c).parts))
            for c in classes}


def load_image_folder(root: str, size: int | None, max_broken: float = 0.01, progress: bool = False):
    """A folder with one sub-folder per class. Returns (X uint8 [N, C, H, W], labels, classes,
    whether the images were resized). A file that cannot be read is skipped with a notice; more
    than `max_broken` of them is an error."""
    import warnings

    from tqdm.auto import tqdm

    from training.rules import DataNote, names
    base = Path(root)
    files = image_files(root)
    everything = [f for fs in files.values() for f in fs]
    sizes, modes, broken = survey(everything)
    hw = None
    if size:
        hw = (size, size)
    elif len(set(sizes.values())) > 1:
        side = typical_size(sizes.values())
        hw = (side, side)
        warnings.warn(f"images in {root} have different sizes ({len(set(sizes.values()))} sizes); each is "
                      f"scaled and centre-cropped to {side}x{side} (the median shorter side, at most "
                      f"{MAX_AUTO_SIZE}), as the service will do with uploads; --image-size N picks "
                      "another size", DataNote)
    channels = 1 if all(m in GRAY_MODES for m in modes.values()) else 3
    images, labels = [], []
    readable = [(c, f) for c, fs in files.items() for f in fs if f in sizes]
    for c, f in tqdm(readable, desc="read images", unit=" images", disable=not progress):
        try:
            images.append(read_image(f, channels, hw))
            labels.append(c)
        except ImageError:
            broken.append(f)
    if broken:
        share = len(broken) / max(len(everything), 1)
        listed = names(sorted(str(f.relative_to(base)) for f in broken))
        if share > max_broken:
            raise ImageError(f"{len(broken)} of {len(everything)} images in {root} cannot be read "
                             f"({share:.1%}, more than --max-broken-images {max_broken:g}): {listed}")
        warnings.warn(f"skipped {len(broken)} of {len(everything)} images that cannot be read: {listed}",
                      DataNote)
    found = sorted(set(labels))
    if len(found) < 2:
        raise ImageError(f"{root} needs one sub-folder per class with PNG/JPEG files in it, and at "
                         f"least two classes; found {len(found)}")
    return np.stack(images), labels, found, hw is not None


def digits_images():
    """scikit-learn's 8x8 digits (no download) as one-channel uint8 images, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return X, digits.target.tolist(), list(range(10))
