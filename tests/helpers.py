"""Helpers shared by test modules (which never import each other), and datasets of real photographs in the formats
real image folders hold (scikit-learn's two sample photographs: nothing is downloaded)."""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.common.cli import run_cli
from pipeline.search import SearchOptions
from pipeline.supertrain import SupertrainOptions
from supervit import ArchConfig, SubnetSampler, SuperViT, get_arch, save_checkpoint, supertrain_step
from supervit.data import synthetic

BROKEN = ("zz_truncated.jpg", "zz_not_an_image.png")  # the undecodable files of the folder_with_bad_images fixture
LATENCY_RESOURCE = "latency_device"  # a custom resource only the second node of the test cluster has

# A small 3-channel architecture: fast forwards with DeiT's channel count, three grids and three pruning stages.
SMALL = ArchConfig(
    patch_size=4,
    embed_dim=48,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    grids=(4, 6, 8),
    prune_blocks=(1, 3, 5),
    in_chans=3,
    name="small",
)


def one_line_error(main, args: list[str], capsys) -> str:
    """Run a command's ``main`` on ``args``; assert exit status 2 and one line on stderr; return that line."""
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged in run ``run_id``."""
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def tiny_checkpoint(path: Path, trained: bool) -> Path:
    """A `tiny` supernet on the synthetic data (one epoch of the sandwich recipe when ``trained``)."""
    torch.manual_seed(0)
    arch = get_arch("tiny")
    data = synthetic(arch)
    model = SuperViT(arch, num_classes=data.num_classes, pos_embed_init="sincos")
    if trained:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sampler = SubnetSampler(arch, "sandwich", schedules=True)
        for x, y in torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True):
            supertrain_step(model, x, y, sampler.sample(), opt, clip_grad=1.0)
    return save_checkpoint(path, model, extra={"data": "synthetic", "preset": "tiny"})


def supertrain_opts(tmp_path: Path, mlflow_uri: str, **kw) -> SupertrainOptions:
    """A short two-worker supertraining of `tiny` on the synthetic data."""
    base = dict(
        preset="tiny",
        data="synthetic",
        epochs=2,
        batch_size=32,
        warmup_epochs=0.5,
        workers=2,
        cpus_per_worker=1,
        storage=str(tmp_path / "ray"),
        mlflow_uri=mlflow_uri,
        name="t",
    )
    return SupertrainOptions(**{**base, **kw})


def search_opts(tmp_path: Path, mlflow_uri: str, checkpoint: Path, **kw) -> SearchOptions:
    """A small search of a `tiny` checkpoint: few trials, short eager latency measurements (compiling costs
    seconds a subnet; tests that need it ask for it), no latency report, one CPU per trial."""
    base = dict(
        budgets=["0.6x"],
        checkpoint=str(checkpoint),
        trials=3,
        latency_runs=3,
        latency_mode="eager",
        latency_report=False,
        trial_cpus=1,
        seed=1,
        storage=str(tmp_path / "ray"),
        mlflow_uri=mlflow_uri,
        latency_table=str(tmp_path / "lat.parquet"),
    )
    return SearchOptions(**{**base, **kw})


def best_trial(rows: list[dict]) -> dict:
    """The trial a search must choose, written out independently of `pipeline.search.select`: the highest top-1, then
    the lowest latency, then the fewest FLOPs."""
    return max(rows, key=lambda r: (r["top1"], -r["latency_ms"], -r["gflops"]))


def download(uri: str, run_id: str, path: str, dst: Path) -> str:
    """Download artifact ``path`` of run ``run_id`` into ``dst``; its local path."""
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri, dst_path=str(dst))


def check_supertrain_run(res, mlflow_uri: str, tmp_path: Path, workers: int, epochs: int):
    """Params, per-epoch metrics, final table, artifacts, checkpoint and registered model of a finished run;
    returns the supernet of its logged checkpoint."""
    from supervit import load_checkpoint

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["workers"] == str(workers) and params["preset"] == "tiny" and params["epochs"] == str(epochs)
    assert params["arch.embed_dim"] == str(get_arch("tiny").embed_dim) and params["train_size"] == "256"
    assert {"ray_version", "torch_version", "lr", "batch_size", "seed", "recipe"} <= set(params)
    roles = [f"loss/{r.name}" for r in SubnetSampler(get_arch("tiny"), params["recipe"]).sample()]
    assert params["recipe"] == "balanced"  # the default
    assert roles == ["loss/full", "loss/smallest_grid", "loss/grid1", "loss/grid2"]
    for key in (*roles, "lr", "epoch_time_s", "images_per_s", "top1/full", "top1/smallest"):
        assert metric_steps(mlflow_uri, res.run_id, key) == list(range(epochs)), key
    arch = get_arch("tiny")
    cells = [f"g{g}_k{r:g}" for g in arch.grids for r in arch.keep_rates]
    assert set(res.table) == set(cells)
    for cell in cells:
        assert 0 <= run.data.metrics[f"top1/{cell}"] <= 100
        assert run.data.metrics[f"test_top1/{cell}"] == pytest.approx(res.table[cell]["test_top1"])
    # The run's description in the MLflow UI is the accuracy table.
    assert "| grid \\ keep |" in run.data.tags["mlflow.note.content"]
    results = {os.path.basename(a.path) for a in client.list_artifacts(res.run_id, "results")}
    assert results == {"accuracy_table.md", "accuracy_table.csv", "accuracy_table.png"}
    supernet = load_checkpoint(download(mlflow_uri, res.run_id, "checkpoint/model.safetensors", tmp_path / "dl"))
    assert supernet.arch == arch
    versions = client.search_model_versions("name='supervit-tiny'")
    assert [v.run_id for v in versions] == [res.run_id]
    check_pyfunc(mlflow_uri, f"models:/supervit-tiny/{versions[0].version}", supernet, arch.largest)
    assert run.data.tags["ray.storage_path"] == res.storage_path and os.path.isdir(res.storage_path)
    return supernet


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with (None for parameters without one)."""

    def __init__(self, named_params, lr):
        self.names = [n for n, _ in named_params]
        super().__init__([p for _, p in named_params], lr=lr)
        self.seen = []

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.seen.append(
            {n: None if p.grad is None else p.grad.clone() for n, p in zip(self.names, params, strict=True)}
        )
        return super().step(closure)


def check_pyfunc(mlflow_uri: str, model_uri: str, supernet, subnet) -> None:
    """The registered model, loaded with ``mlflow.pyfunc``, predicts batches of 1, 2 and 64 images exactly as the
    library's forward of ``subnet`` does."""
    mlflow.set_tracking_uri(mlflow_uri)
    served = mlflow.pyfunc.load_model(model_uri)
    arch = supernet.arch
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 64):
        x = torch.randn(n, arch.in_chans, arch.img_size, arch.img_size, generator=g)
        with torch.no_grad():
            expected = supernet.eval()(x, subnet).numpy()
        got = np.asarray(served.predict(x.numpy()))
        assert got.shape == expected.shape, (n, got.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ real photographs

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


def peaked_model(arch: ArchConfig, dtype=torch.float32, num_classes: int = 7) -> SuperViT:
    """A SuperViT with larger weights than its init: peaked attention, so subnets rank tokens distinctly."""
    torch.manual_seed(1)
    model = SuperViT(arch, num_classes=num_classes).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model
