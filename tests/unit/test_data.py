"""Datasets: digits, synthetic, ImageNet-style folders, Parquet, and the errors on bad input."""

import io
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from supervit.config import get_arch
from supervit.data import DataError, Splits, digits, image_folder, load_data, parquet, synthetic, verify

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
