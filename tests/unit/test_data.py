"""Datasets: digits, synthetic, ImageNet-style folders, Parquet (local and bucket URIs), decoding of real
photo formats, timm transforms, balanced subsets, and the errors on bad input."""

import io
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import FORMATS, TINY_SIZE, encode, expected, photo_crop, write_photo_dataset
from supervit.config import get_arch
from supervit.data import (
    DEIT_AUGMENT,
    Augment,
    DataError,
    ImageFiles,
    ParquetRows,
    Splits,
    balanced_subset,
    build_transform,
    decode_image,
    digits,
    image_folder,
    load_data,
    load_image,
    parquet,
    redact,
    synthetic,
    verify,
)

TINY = get_arch("tiny")
DEIT_TI = get_arch("deit_ti")
SPLITS = ("train", "search", "test")


def check_item(ds, arch, i=0):
    x, y = ds[i]
    assert x.dtype == torch.float32 and x.shape == (arch.in_chans, arch.img_size, arch.img_size)
    assert isinstance(y, int)
    assert torch.isfinite(x).all()


def png_bytes(color, size=(20, 12), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_tiny():
    return digits(TINY)


def test_digits_shapes_and_sizes(digits_tiny):
    s = digits_tiny
    assert isinstance(s, Splits) and s.num_classes == 10 and s.name == "digits"
    assert (len(s.train), len(s.search), len(s.test)) == (1257, 180, 360)
    for name in SPLITS:
        check_item(getattr(s, name), TINY)
    # Normalised with the train split's statistics (upsampling smooths, so the std ends a bit under 1).
    x = s.train.tensors[0]
    assert abs(x.mean().item()) < 0.01 and 0.75 < x.std().item() < 1.0


def test_digits_deit_ti_three_channels():
    s = digits(DEIT_TI)
    check_item(s.train, DEIT_TI)
    check_item(s.test, DEIT_TI, 5)
    x, _ = s.search[0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_digits_disjoint_deterministic_and_stratified(digits_tiny):
    s, again = digits_tiny, digits(TINY)
    idx = [set(getattr(s, n).indices.tolist()) for n in SPLITS]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == 1797
    for name in SPLITS:
        a, b = getattr(s, name), getattr(again, name)
        assert torch.equal(a.tensors[0], b.tensors[0]) and a.targets == b.targets
        assert set(a.targets) == set(range(10))
    # Pixel identity too: no test image is a train image (digits has no duplicate images).
    rows = {tuple(r.tolist()) for r in s.train.tensors[0].flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in s.test.tensors[0].flatten(1))


def test_datasets_pickle(digits_tiny):
    ds = pickle.loads(pickle.dumps(digits_tiny.search))
    assert torch.equal(ds[3][0], digits_tiny.search[3][0]) and ds.targets == digits_tiny.search.targets


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic():
    s = synthetic(TINY, num_classes=4, train_size=40, search_size=12, test_size=8, seed=3)
    assert (len(s.train), len(s.search), len(s.test), s.num_classes) == (40, 12, 8, 4)
    for name in SPLITS:
        check_item(getattr(s, name), TINY)
        assert set(getattr(s, name).targets) == set(range(4))
    assert torch.equal(s.train.tensors[0], synthetic(TINY, 4, 40, 12, 8, seed=3).train.tensors[0])
    assert not torch.equal(s.train.tensors[0], synthetic(TINY, 4, 40, 12, 8, seed=4).train.tensors[0])
    # Learnable: class means from train classify the test split (a ViT does at least as well).
    x, y = s.train.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(4)]).flatten(1)
    xt, yt = s.test.tensors
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() >= 0.9
    check_item(synthetic(DEIT_TI, train_size=4, search_size=2, test_size=2).train, DEIT_TI)


# ---------------------------------------------------------------------------------------------- image folder


@pytest.fixture
def tree(tmp_path):
    """3 classes x 4 train images (JPEG and PNG, various sizes) and 2 val images per class."""
    root = tmp_path / "imgs"
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "eel": (0, 0, 255)}
    for split, n in (("train", 4), ("val", 2)):
        for c, color in colors.items():
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                ext = "jpg" if i % 2 else "png"
                Image.new("RGB", (30 + 7 * i, 20 + 5 * i), color).save(d / f"{c}{i}.{ext}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(tree):
    s = image_folder(tree, TINY, search_fraction=0.25)
    assert s.num_classes == 3 and s.name == f"imagefolder:{tree}"
    assert (len(s.train), len(s.search), len(s.test)) == (9, 3, 6)
    assert sorted(s.search.targets) == [0, 1, 2] and s.train.train and not s.search.train
    assert not set(s.train.paths) & set(s.search.paths)
    for p, t in zip(s.train.paths + s.test.paths, s.train.targets + s.test.targets, strict=True):
        assert f"/{['cat', 'dog', 'eel'][t]}/" in p
    for name in SPLITS:
        check_item(getattr(s, name), TINY)
    # Channels keep their order through the transforms: a red (cat) image is above the mean in R only.
    rgb = image_folder(tree, DEIT_TI)
    check_item(rgb.train, DEIT_TI)
    x, y = rgb.test[0]
    assert y == 0 and x[0].mean() > 0 > x[2].mean()
    assert image_folder(tree, TINY, 0.25).search.paths == s.search.paths  # deterministic
    assert len(image_folder(tree, TINY).search) == 3  # at least one per class
    verify(s)
    ds = pickle.loads(pickle.dumps(s.train))
    check_item(ds, TINY, 2)


def test_image_folder_via_load_data(tree):
    s = load_data(str(tree), TINY, search_fraction=0.5)
    assert len(s.search) == 6 and s.name.startswith("imagefolder:")


def test_image_folder_errors(tmp_path, tree):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "nope", TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        load_data(str(empty), TINY)
    (empty / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        image_folder(empty, TINY)
    (empty / "train" / "a").mkdir()
    (empty / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"train has no images"):
        image_folder(empty, TINY)
    (tree / "val" / "fox").mkdir()
    with pytest.raises(DataError, match="fox"):
        image_folder(tree, TINY)


def test_image_folder_corrupt_image(tree):
    bad = tree / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    s = image_folder(tree, TINY)
    i = s.test.paths.index(str(bad))
    with pytest.raises(DataError, match="broken.jpg"):
        s.test[i]
    check_item(s.test, TINY, 0)  # the other images still load


def test_verify_catches_corrupt_image(tree):
    (tree / "train" / "cat" / "cat0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cat0.png"):
        verify(image_folder(tree, TINY, search_fraction=0))


# ---------------------------------------------------------------------------------------------- parquet


def write_parquet(path, n, struct=False, label_offset=0, image_col="image", label_col="label"):
    colors = [(40 * i % 256, 255 - 30 * i % 256, 90) for i in range(n)]
    blobs = [png_bytes(c, fmt="PNG" if i % 2 else "JPEG") for i, c in enumerate(colors)]
    images = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)] if struct else blobs
    labels = [(i + label_offset) % 3 for i in range(n)]
    pq.write_table(pa.table({image_col: images, label_col: pa.array(labels, pa.int64())}), path)


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_named_splits(tmp_path, struct):
    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "train-00000-of-00002.parquet", 12, struct)
    write_parquet(d / "train-00001-of-00002.parquet", 9, struct)
    write_parquet(d / "test-00000-of-00001.parquet", 6, struct, label_offset=1)
    for spec in (str(d), str(d / "*.parquet")):
        s = load_data(spec, TINY, search_fraction=0.1)
        assert s.num_classes == 3 and s.name == f"parquet:{spec}"
        assert (len(s.train) + len(s.search), len(s.search), len(s.test)) == (21, 3, 6)
        train_rows, search_rows = set(s.train.sources), set(s.search.sources)
        assert not train_rows & search_rows and len(train_rows | search_rows) == 21
        assert all("test-" in f for f, _ in s.test.sources)
        for name in SPLITS:
            check_item(getattr(s, name), TINY)
        verify(s)
    s = parquet(str(d), DEIT_TI)
    check_item(s.train, DEIT_TI, 1)
    assert s.search.sources == parquet(str(d), DEIT_TI).search.sources
    check_item(pickle.loads(pickle.dumps(s.test)), DEIT_TI)


def test_parquet_single_file_pool(tmp_path):
    f = tmp_path / "data.parquet"
    write_parquet(f, 20, struct=True, image_col="img", label_col="labels")
    s = load_data(str(f), TINY)
    assert (len(s.train), len(s.search), len(s.test)) == (13, 3, 4)
    rows = [r for name in SPLITS for _, r in getattr(s, name).sources]
    assert sorted(rows) == list(range(20))
    assert s.test.sources == parquet(str(f), TINY).test.sources
    check_item(s.test, TINY)
    # Split named by folder instead of file name.
    for split, n in (("train", 8), ("validation", 3)):
        (tmp_path / "hf" / split).mkdir(parents=True)
        write_parquet(tmp_path / "hf" / split / "0000.parquet", n)
    s = load_data(str(tmp_path / "hf"), TINY)
    assert (len(s.train) + len(s.search), len(s.test)) == (8, 3)


def test_parquet_errors(tmp_path):
    with pytest.raises(DataError, match="match"):
        load_data(str(tmp_path / "nothing-*.parquet"), TINY)
    f = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), f)
    with pytest.raises(DataError, match=r"cols.parquet.*columns found: pixels, y"):
        parquet(str(f), TINY)
    f = tmp_path / "notparquet.parquet"
    f.write_text("hello")
    with pytest.raises(DataError, match="notparquet.parquet is not a valid parquet file"):
        parquet(str(f), TINY)
    f = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}), f)
    with pytest.raises(DataError, match="zero rows"):
        parquet(str(f), TINY)
    f = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [png_bytes((1, 2, 3))] * 4 + [b"junk"], "label": [0, 1, 0, 1, 1]}), f)
    s = parquet(str(f), TINY, search_fraction=0)
    ds, i = next((ds, i) for ds in (s.train, s.test) for i, (_, r) in enumerate(ds.sources) if r == 4)
    with pytest.raises(DataError, match="bad.parquet row 4"):
        ds[i]
    (tmp_path / "shards").mkdir()
    with pytest.raises(DataError, match="no .parquet files in .*shards"):
        parquet(str(tmp_path / "shards"), TINY)


def test_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="unknown dataset.*digits.*synthetic.*parquet"):
        load_data(str(tmp_path / "imagenet"), TINY)
    with pytest.raises(DataError, match="unknown dataset"):
        load_data("cifar10", TINY)


# ---------------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def photo():
    return photo_crop(1, np.random.default_rng(0), (80, 60))


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.mark.parametrize("fmt", [f for f, _ in FORMATS])
def test_decode_every_format(photo, fmt):
    data = encode(photo, fmt)
    rgb = decode_image(data, 3)
    assert rgb.mode == "RGB"
    # Lossy formats (JPEG, WebP, GIF's palette) stay within a few grey levels of the source on average.
    assert mean_abs_diff(rgb, expected(photo, fmt)) < 6, fmt
    grey = decode_image(data, 1)
    assert grey.mode == "L" and grey.size == rgb.size
    assert mean_abs_diff(grey, expected(photo, fmt).convert("L")) < 6, fmt


def test_decode_fixes_what_plain_pil_gets_wrong(photo):
    # What a plain `Image.open(f).convert("RGB")` does with these files, and why decode_image exists.
    raw = {f: Image.open(io.BytesIO(encode(photo, f))) for f in ("png_16bit_gray", "png_rgba", "jpeg_exif_rotated")}
    assert raw["png_16bit_gray"].mode.startswith("I")
    assert mean_abs_diff(raw["png_16bit_gray"].convert("RGB"), expected(photo, "png_16bit_gray")) > 100  # clipped
    assert mean_abs_diff(raw["png_rgba"].convert("RGB"), expected(photo, "png_rgba")) > 30  # alpha dropped
    assert raw["jpeg_exif_rotated"].size == photo.size[::-1]  # on its side
    assert decode_image(encode(photo, "jpeg_exif_rotated")).size == photo.size
    assert decode_image(encode(photo, "tiny")).size == TINY_SIZE


def test_decode_errors(photo):
    good = encode(photo, "jpeg_rgb")
    for data, why in ((None, "null"), (b"", "cannot decode"), (b"GIF89a junk", "cannot decode")):
        with pytest.raises(DataError, match=why) as e:
            decode_image(data)
        assert "0x" not in str(e.value)  # PIL names its buffer by address: no use to a reader, and never the same
    with pytest.raises(DataError, match="truncated|cannot decode"):
        decode_image(good[: len(good) // 2])


@pytest.mark.parametrize("fmt", ["tiny", "png_16bit_rgb", "jpeg_cmyk"])
@pytest.mark.parametrize("arch", [TINY, DEIT_TI], ids=["tiny", "deit_ti"])
def test_load_image_any_format_any_size(photo, fmt, arch):
    data = encode(photo, fmt)
    for train, aug in ((False, None), (True, None), (True, DEIT_AUGMENT)):
        x = load_image(data, arch.img_size, arch.in_chans, train, aug)
        assert x.dtype == torch.float32 and x.shape == (arch.in_chans, arch.img_size, arch.img_size)
        assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------- transforms


def names(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_build_transform_light_and_deit():
    light = build_transform(DEIT_TI, train=True)
    assert names(light) == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]
    assert str(light.transforms[0].interpolation).lower().endswith("bicubic")
    deit = build_transform(DEIT_TI, True, aug=DEIT_AUGMENT.aug, reprob=DEIT_AUGMENT.reprob)
    assert "RandAugment" in names(deit) and names(deit)[-1] == "RandomErasing"
    assert deit.transforms[-1].probability == 0.25 and deit.transforms[-1].mode == "pixel"
    ra = deit.transforms[names(deit).index("RandAugment")]
    assert ra.num_layers == 2 and len(ra.ops) == 15 and ra.ops[0].magnitude == 9  # rand-m9-mstd0.5-inc1
    ev = build_transform(DEIT_TI, train=False)
    assert names(ev) == ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]
    assert ev.transforms[0].size == 256 and str(ev.transforms[0].interpolation).lower().endswith("bicubic")
    assert build_transform(TINY, train=False).transforms[0].size == 18  # 16 * 256 / 224, floored
    norm = build_transform(TINY, train=False).transforms[-1]
    assert norm.mean.shape == (1,) and abs(float(norm.mean[0]) - 0.449) < 1e-3  # ImageNet's, averaged
    with pytest.raises(DataError, match="augmentation.*rand-m9"):
        build_transform(DEIT_TI, True, aug="bogus")
    assert names(build_transform(DEIT_TI, True, aug="none")) == names(light)


def test_randaugment_posterize_to_zero_bits_does_not_fail(photo):
    # Magnitude 10 (which rand-m9-mstd0.5 samples ~2% of the time) asks PosterizeIncreasing for 0 bits.
    from timm.data import create_transform

    raw = create_transform(32, is_training=True, auto_augment="rand-m10-mstd0-inc1")
    op = next(o for o in raw.transforms[2].ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    with pytest.raises(ValueError, match="bits"):  # timm 1.0 on Pillow >= 11, unpatched
        op(photo)
    ours = build_transform(DEIT_TI, True, aug="rand-m10-mstd0-inc1")
    op = next(o for o in ours.transforms[names(ours).index("RandAugment")].ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert np.asarray(op(photo)).max() == 0  # black, as TensorFlow's RandAugment gives
    aa = build_transform(DEIT_TI, True, aug="v0")  # AutoAugment's policies get the same op
    assert all(
        o.aug_fn.__module__ == "supervit.data.transforms"
        for sub in aa.transforms[2].policy
        for o in sub
        if "Posterize" in o.name
    )


def test_eval_transform_is_deterministic_train_is_not(photo):
    data = encode(photo, "jpeg_rgb")
    a, b = (load_image(data, 32, 3, False) for _ in range(2))
    assert torch.equal(a, b)
    views = [load_image(data, 32, 3, True, DEIT_AUGMENT) for _ in range(4)]
    assert not all(torch.equal(views[0], v) for v in views[1:])


# ---------------------------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    return write_photo_dataset(tmp_path_factory.mktemp("photos"), num_classes=3, train_per_class=10, val_per_class=4)


def test_photo_folder_every_item_decodes(photo_data):
    folder, pq_dir = photo_data
    for arch in (TINY, DEIT_TI):
        s = load_data(str(folder), arch)
        assert isinstance(s.train, ImageFiles) and s.num_classes == 3
        assert (len(s.train) + len(s.search), len(s.test)) == (30, 12)
        exts = {p.rsplit(".", 1)[1] for p in s.train.paths + s.search.paths}
        assert exts == {"jpg", "png", "gif", "webp"}
        for ds in (s.train, s.search, s.test):
            x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
            assert x.shape == (len(ds), arch.in_chans, arch.img_size, arch.img_size) and torch.isfinite(x).all()
            assert y.tolist() == ds.targets


def test_parquet_twin_holds_an_index_only(photo_data):
    folder, pq_dir = photo_data
    s = load_data(str(pq_dir), DEIT_TI)
    assert isinstance(s.train, ParquetRows) and s.num_classes == 3
    assert (len(s.train) + len(s.search), len(s.test)) == (30, 12)
    assert Counter(s.train.targets + s.search.targets) == {0: 10, 1: 10, 2: 10}
    encoded = sum(f.stat().st_size for f in pq_dir.glob("*.parquet"))
    # The dataset that travels to every worker holds references, not the images.
    assert len(pickle.dumps(s.train)) < encoded / 10
    assert not hasattr(s.train, "blobs")
    x, y = next(iter(torch.utils.data.DataLoader(s.test, batch_size=len(s.test))))
    assert x.shape == (12, 3, 224, 224) and y.tolist() == s.test.targets
    # Reading an item streams its row group (8 rows here) up to it, and the next item continues that read.
    ds = s.test
    assert ds.files[ds.file_index[0]].row_group_starts == [0, 8]
    ds[0]
    stream = ds._stream
    assert stream[:3] == (int(ds.file_index[0]), 0, int(ds.rows[0]) + 1)
    ds[1]
    assert ds._stream[3] is stream[3] and ds._stream[2] == int(ds.rows[1]) + 1


def test_file_uri_lists_and_reads(photo_data, tree, tmp_path):
    folder, pq_dir = photo_data
    s = load_data(f"file://{folder}", TINY)
    plain = load_data(str(folder), TINY)
    assert s.name == f"imagefolder:file://{folder}"
    assert s.train.sources == [f"file://{p}" for p in plain.train.paths]
    assert s.search.targets == plain.search.targets
    check_item(s.train, TINY, 3)
    for spec in (f"file://{pq_dir}", f"file://{pq_dir}/train-*.parquet", f"file://{pq_dir}/**/*.parquet"):
        p = load_data(spec, TINY)
        assert isinstance(p.train, ParquetRows) and p.name == f"parquet:{spec}"
        assert all(f.startswith(f"file://{pq_dir}/") for f, _ in p.train.sources)
        check_item(p.train, TINY, 1)
    assert len(load_data(f"file://{pq_dir}/train-*.parquet", TINY).test) == 6  # one pool: 20% of 30
    with pytest.raises(DataError, match="does not exist"):
        image_folder(f"file://{tmp_path}/nope", TINY)
    with pytest.raises(DataError, match="no parquet files match"):
        load_data(f"file://{pq_dir}/nothing-*.parquet", TINY)
    bad = tree / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    t = load_data(f"file://{tree}", TINY)
    with pytest.raises(DataError, match=f"file://{bad}"):
        t.test[t.test.paths.index(str(bad))]


def test_redact_credentials():
    assert redact("s3://AKIA:secret@bucket/x?endpoint_override=h:1") == "s3://***@bucket/x?endpoint_override=h:1"
    assert redact("/data/imagenet") == "/data/imagenet"


def test_subset_and_with_augment(photo_data):
    folder, pq_dir = photo_data
    for spec in (folder, pq_dir):
        s = load_data(str(spec), TINY)
        idx = [4, 0, 7]
        sub = s.search.subset(idx) if len(s.search) > 7 else s.train.subset(idx)
        src = s.search if len(s.search) > 7 else s.train
        assert sub.sources == [src.sources[i] for i in idx] and sub.targets == [src.targets[i] for i in idx]
        assert torch.equal(sub.with_augment(train=False)[1][0], src.with_augment(train=False)[0][0])
        deit = s.train.with_augment(DEIT_AUGMENT)
        assert deit.augment == DEIT_AUGMENT and s.train.augment == Augment() and deit.train
    d = digits(TINY).search.subset([3, 1])
    assert d.targets == [digits(TINY).search.targets[i] for i in (3, 1)]


# ---------------------------------------------------------------------------------------------- balanced subset


def test_balanced_subset():
    targets = [0] * 50 + [1] * 30 + [2] * 5 + [3] * 15
    pick = balanced_subset(targets, 40, seed=0)
    assert pick == sorted(set(pick)) and len(pick) == 40
    counts = Counter(targets[i] for i in pick)
    assert counts[2] == 5  # a small class gives all it has; the others share the rest evenly
    assert sorted(counts[c] for c in (0, 1, 3)) == [11, 12, 12]
    assert balanced_subset(targets, 40, seed=0) == pick  # deterministic
    assert balanced_subset(targets, 40, seed=1) != pick
    even = Counter(targets[i] for i in balanced_subset(targets, 18, seed=3))
    assert max(even.values()) - min(even.values()) <= 1 and len(even) == 4
    assert balanced_subset(targets, 1000) == list(range(100))
    assert balanced_subset(targets, 0) == []
    before = list(targets)
    balanced_subset(targets, 10, seed=5)
    assert targets == before  # pure
    with pytest.raises(ValueError):
        balanced_subset(targets, -1)


@pytest.mark.parametrize("struct", [False, True])
def test_a_large_row_group_is_read_image_by_image_in_bounded_memory(tmp_path, struct):
    from supervit.data.parquet import BATCH_ROWS

    rng = np.random.default_rng(0)
    peaks, columns = {}, {}
    for n in (8000, 16000):  # pyarrow's defaults: one row group for the whole file, 1.5 KB "images"
        blobs = [rng.bytes(1500) for _ in range(n)]
        images = [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(blobs)] if struct else blobs
        path = tmp_path / f"one_group_{n}.parquet"
        pq.write_table(pa.table({"image": images, "label": [i % 3 for i in range(n)]}), path)
        assert pq.ParquetFile(path).metadata.num_row_groups == 1
        rows = parquet(str(path), TINY, search_fraction=0.0).train
        base, peak = pa.total_allocated_bytes(), 0
        for i in range(len(rows)):  # image by image, as a DataLoader (or the driver's start-up check) reads them
            assert rows.read(i) == blobs[int(rows.rows[i])]
            peak = max(peak, pa.total_allocated_bytes() - base)
        peaks[n], columns[n] = peak, sum(map(len, blobs))
    # What the reader materialises does not grow with the row group: a page or two (pyarrow writes at most 1024
    # rows a page), not the group, which reading it whole (as before) held entire.
    assert peaks[8000] < 0.5 * columns[8000], peaks
    assert peaks[16000] < 1.25 * peaks[8000], peaks
    reader = rows.reader
    wanted = [15999, 10, 11, 8000]
    got = dict(reader.iter_rows(0, 0, wanted))
    assert sorted(got) == sorted(wanted) and all(got[r] == blobs[r] for r in wanted)
    assert 0 < reader.peak_rows <= BATCH_ROWS  # and at most one record batch of Python bytes
    # Reading stops after the last wanted row; a row the group lacks is an error, not a short read.
    early = rows.reader
    assert [r for r, _ in early.iter_rows(0, 0, [0, 5])] == [0, 5] and early.peak_rows <= BATCH_ROWS
    with pytest.raises(IndexError, match="no such row"):
        list(early.iter_rows(0, 0, [16000]))
