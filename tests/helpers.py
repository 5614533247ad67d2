"""Shared test helpers: datasets of real photographs in the formats real image folders hold.

The photographs are scikit-learn's two sample images (``load_sample_images``: a Chinese temple and a
flower, 640x427 RGB), so nothing is downloaded. Class ``c`` is a horizontal band of one of the photos, so
the classes are learnable from the pixels.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Every format `write_photo_dataset` cycles through, as (name, file extension).
FORMATS = (
    ("jpeg_rgb", "jpg"),
    ("jpeg_gray", "jpg"),
    ("jpeg_cmyk", "jpg"),
    ("png_rgba", "png"),
    ("png_16bit_gray", "png"),
    ("png_16bit_rgb", "png"),
    ("gif_palette", "gif"),
    ("webp", "webp"),
    ("jpeg_exif_rotated", "jpg"),
    ("tiny", "png"),
)
TINY_SIZE = (7, 5)  # smaller than any crop: the transforms must scale it up


@functools.cache
def photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photographs as uint8 (427, 640, 3) arrays."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photo_crop(label: int, rng: np.random.Generator, size: tuple[int, int] = (64, 48), bands: int = 2) -> Image.Image:
    """A random crop of class ``label``'s region (photo ``label % 2``, horizontal band ``label // 2 % bands``),
    resized to about ``size`` (w, h) with a little jitter, as an RGB image."""
    img = photos()[label % 2]
    h, w = img.shape[:2]
    top, bottom = (label // 2 % bands) * h // bands, ((label // 2 % bands) + 1) * h // bands
    ch = int(rng.integers((bottom - top) // 2, bottom - top + 1))
    cw = min(w, int(ch * rng.uniform(1.0, 1.6)))
    y = int(rng.integers(top, bottom - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    out = (int(size[0] * rng.uniform(0.8, 1.25)), int(size[1] * rng.uniform(0.8, 1.25)))
    return Image.fromarray(img[y : y + ch, x : x + cw]).resize(out, Image.BICUBIC)


def _png_16bit_rgb(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written by hand: signature, IHDR, IDAT, IEND."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str) -> bytes:
    """``img`` (RGB) encoded as format ``fmt`` (a name of `FORMATS`). What a correct decoder must give back
    is `expected`."""
    buf = io.BytesIO()
    if fmt == "jpeg_rgb":
        img.save(buf, "JPEG", quality=92)
    elif fmt == "jpeg_gray":
        img.convert("L").save(buf, "JPEG", quality=92)
    elif fmt == "jpeg_cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=92)
    elif fmt == "png_rgba":
        rgba = img.convert("RGBA")
        alpha = np.tile(np.linspace(0, 255, img.width, dtype=np.uint8), (img.height, 1))
        rgba.putalpha(Image.fromarray(alpha, "L"))
        rgba.save(buf, "PNG")
    elif fmt == "png_16bit_gray":
        g = np.asarray(img.convert("L"), np.uint16) * 257  # full 16-bit range: a naive convert() gives white
        Image.fromarray(g).save(buf, "PNG")
    elif fmt == "png_16bit_rgb":
        return _png_16bit_rgb(np.asarray(img, np.uint16) * 257)
    elif fmt == "gif_palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(buf, "GIF")
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=90)
    elif fmt == "jpeg_exif_rotated":
        # Stored turned a quarter counter-clockwise, with orientation 6 ("rotate 90 CW to display").
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif)
    elif fmt == "tiny":
        img.resize(TINY_SIZE, Image.BICUBIC).save(buf, "PNG")
    else:
        raise ValueError(f"unknown format {fmt}")
    return buf.getvalue()


def expected(img: Image.Image, fmt: str) -> Image.Image:
    """What decoding ``encode(img, fmt)`` to RGB should give (up to compression noise)."""
    if fmt in ("jpeg_gray", "png_16bit_gray"):
        return img.convert("L").convert("RGB")
    if fmt == "png_rgba":  # composited onto white
        a = np.linspace(0, 1, img.width)[None, :, None]
        return Image.fromarray(np.rint(np.asarray(img) * a + 255 * (1 - a)).astype(np.uint8))
    if fmt == "tiny":
        return img.resize(TINY_SIZE, Image.BICUBIC)
    return img


def write_photo_dataset(
    root: Path,
    num_classes: int = 3,
    train_per_class: int = 10,
    val_per_class: int = 4,
    size: tuple[int, int] = (64, 48),
    row_group_size: int = 8,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write an ImageFolder of real photo crops (every format of `FORMATS`, in turn) and its Parquet twin.

    ``root/folder/{train,val}/class_<c>/<i>.<ext>`` and ``root/parquet/train-0000k-of-00002.parquet`` plus
    ``root/parquet/test-00000-of-00001.parquet`` (columns ``image``: bytes, ``label``: int64; rows shuffled,
    as shards usually are; row groups of ``row_group_size``) holding the same encoded files.

    Returns:
        (ImageFolder root, Parquet folder).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder, pq_dir = Path(root) / "folder", Path(root) / "parquet"
    pq_dir.mkdir(parents=True, exist_ok=True)
    k = 0
    rows: dict[str, list[tuple[bytes, int]]] = {"train": [], "val": []}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            d = folder / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                fmt, ext = FORMATS[k % len(FORMATS)]
                k += 1
                data = encode(photo_crop(c, rng, size), fmt)
                (d / f"{i:03d}_{fmt}.{ext}").write_bytes(data)
                rows[split].append((data, c))

    def write(path: Path, items: list[tuple[bytes, int]]) -> None:
        order = rng.permutation(len(items))
        table = pa.table(
            {
                "image": pa.array([items[i][0] for i in order], pa.binary()),
                "label": pa.array([items[i][1] for i in order], pa.int64()),
            }
        )
        pq.write_table(table, path, row_group_size=row_group_size)

    half = len(rows["train"]) // 2
    write(pq_dir / "train-00000-of-00002.parquet", rows["train"][:half])
    write(pq_dir / "train-00001-of-00002.parquet", rows["train"][half:])
    write(pq_dir / "test-00000-of-00001.parquet", rows["val"])
    return folder, pq_dir
