"""Streaming input on Ray Data (`pipeline.common.data`): real photo folders and their Parquet twins, local and in a
local S3-compatible bucket, through the same calls the Ray Train worker and the search make."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from supervit.config import get_arch
from supervit.data import DEIT_AUGMENT, DataError, ImageFiles, ParquetRows, load_data

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = get_arch("tiny")
DEIT_TI = get_arch("deit_ti")


def epoch(ds, batch_size=8):
    """(sources, labels, images) of one pass over ``ds``, as the numpy rows Ray Data hands out."""
    src, lab, img = [], [], []
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        src += [str(s) for s in b["source"]]
        lab += b["label"].tolist()
        img.append(b["image"])
    return src, lab, np.concatenate(img)


def names(split) -> list[str]:
    """The split's items as the pipeline names them."""
    if isinstance(split, ParquetRows):
        return [f"{f} row {r}" for f, r in split.sources]
    return list(split.sources)


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_train_batches_shape_dtype_and_coverage(photos, kind):
    from pipeline.common.batches import BadImages
    from pipeline.common.data import train_dataset

    s = load_data(str(photos[0] if kind == "folder" else photos[1]), DEIT_TI)
    assert isinstance(s.train, ImageFiles if kind == "folder" else ParquetRows)
    ds = train_dataset(s.train, augment=DEIT_AUGMENT)
    bad = BadImages(cap=0)
    batches = list(ds.iter_torch_batches(batch_size=8, drop_last=True, collate_fn=bad))
    assert len(batches) == len(s.train) // 8 and bad.count == 0
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (8, 3, 224, 224) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and 0 <= b["label"].min() and b["label"].max() < 3
        assert torch.isfinite(b["image"]).all()
    x = torch.cat([b["image"] for b in batches])
    assert abs(x.mean().item()) < 1.0 and 0.3 < x.std().item() < 2.0  # normalised, not raw [0, 255]
    # One epoch is every train item exactly once, with its own label.
    src, lab, _ = epoch(ds)
    assert Counter(src) == Counter(names(s.train))
    assert dict(zip(src, lab, strict=True)) == dict(zip(names(s.train), s.train.targets, strict=True))


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_fresh_order_and_augmentation_each_epoch_eval_fixed(photos, kind):
    from pipeline.common.data import eval_dataset, train_dataset

    s = load_data(str(photos[0] if kind == "folder" else photos[1]), TINY)
    ds = train_dataset(s.train)
    (src1, _, img1), (src2, _, img2) = epoch(ds), epoch(ds)
    assert sorted(src1) == sorted(src2) and src1 != src2
    # The same image, augmented anew: random crops of a photo differ.
    first = {s: x for s, x in zip(src1, img1, strict=True)}
    same = sum(np.array_equal(first[s], x) for s, x in zip(src2, img2, strict=True))
    assert same <= len(src1) // 4
    ev = eval_dataset(s.test)
    (e1, l1, i1), (e2, _, i2) = epoch(ev, 5), epoch(ev, 3)
    assert e1 == e2 == names(s.test) and l1 == s.test.targets
    assert np.array_equal(i1, i2)
    x, y = s.test[2]  # the map-style dataset and the pipeline agree on the eval transform
    assert np.allclose(i1[2], x.numpy(), atol=1e-6) and y == l1[2]
    mat = ev.materialize()
    assert epoch(mat)[0] == names(s.test)


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_repeated_augmentation(photos, kind):
    from pipeline.common.data import train_dataset

    s = load_data(str(photos[0] if kind == "folder" else photos[1]), TINY)
    n = len(s.train)
    ds = train_dataset(s.train, repeated_aug=3)
    src, lab, img = epoch(ds)
    counts = Counter(src)
    assert len(src) == n  # as many samples per epoch as without
    assert len(counts) == -(-n // 3) and sorted(counts.values())[1:] == [3] * (len(counts) - 1)
    # The copies of one image sit together and each has its own augmentation.
    i = src.index(next(k for k, c in counts.items() if c == 3))
    assert src[i : i + 3] == [src[i]] * 3 and len(set(lab[i : i + 3])) == 1
    assert not np.array_equal(img[i], img[i + 1]) or not np.array_equal(img[i + 1], img[i + 2])
    again = Counter(epoch(ds)[0])
    assert set(again) != set(counts)  # a different third of the images next epoch


def test_bad_images_skipped_counted_named_then_capped(photos, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.common.batches import BadImages
    from pipeline.common.data import eval_dataset, train_dataset

    folder = tmp_path / "folder"
    shutil.copytree(photos[0], folder)
    good = (folder / "train" / "class_0" / "000_jpeg_rgb.jpg").read_bytes()
    bad_files = [folder / "train" / "class_1" / "zz_truncated.jpg", folder / "train" / "class_2" / "zz_garbage.png"]
    bad_files[0].write_bytes(good[: len(good) // 3])
    bad_files[1].write_bytes(b"this is not a png")
    s = load_data(str(folder), TINY, search_fraction=0.0)
    warned = []
    bad = BadImages(cap=5, warn=warned.append)
    ds = train_dataset(s.train)
    for _ in range(2):
        rows = sum(len(b["label"]) for b in ds.iter_torch_batches(batch_size=4, collate_fn=bad))
        assert rows == len(s.train) - 2
    assert bad.count == 2 and bad.rows == 4  # two files, met once per epoch, counted once
    assert sorted(n.split(":")[0] for n in bad.names) == sorted(map(str, bad_files))
    assert len(warned) == 2 and all("skipping undecodable image" in w for w in warned)
    capped = BadImages(cap=1, warn=lambda _: None)
    with pytest.raises(DataError) as e:
        for _ in ds.iter_torch_batches(batch_size=4, collate_fn=capped):
            pass
    msg = str(e.value)
    assert "\n" not in msg and "2 undecodable images, more than --max-bad-images 1" in msg
    assert all(str(f) in msg for f in bad_files)

    # Parquet: a junk row and a null row in a shard.
    pq_dir = tmp_path / "pq"
    shutil.copytree(photos[1], pq_dir)
    test = pq.read_table(pq_dir / "test-00000-of-00001.parquet")
    images = test.column("image").to_pylist()
    images[3], images[9] = b"junk", None
    pq.write_table(
        test.set_column(0, "image", pa.array(images, pa.binary())),
        pq_dir / "test-00000-of-00001.parquet",
        row_group_size=8,
    )
    p = load_data(str(pq_dir), TINY)
    bad = BadImages(cap=2, warn=lambda _: None)
    got = [b for b in eval_dataset(p.test).iter_torch_batches(batch_size=5, collate_fn=bad)]
    assert sum(len(b["label"]) for b in got) == len(p.test) - 2
    assert [n.split(":")[0] for n in bad.names] == [f"{pq_dir}/test-00000-of-00001.parquet row {r}" for r in (3, 9)]
    assert "null" in bad.names[1]


def test_parquet_and_folder_in_an_s3_bucket(photos, s3_bucket):
    from pipeline.common.batches import BadImages
    from pipeline.common.data import eval_dataset, train_dataset

    local = load_data(str(photos[1]), TINY)
    uri = s3_bucket("parquet")
    s = load_data(uri, TINY)
    assert isinstance(s.train, ParquetRows) and "testing:testing" not in s.name and s.name.startswith("parquet:s3://")
    assert [(f.removeprefix("s3://datasets/photos/"), r) for f, r in s.test.sources] == [
        (f.removeprefix(f"{photos[1].parent}/"), r) for f, r in local.test.sources
    ]
    bad = BadImages(cap=0)
    src, lab, img = epoch(train_dataset(s.train))
    assert sorted(src) == sorted(names(s.train)) and img.shape == (len(s.train), 1, 16, 16)
    batches = list(eval_dataset(s.test).iter_torch_batches(batch_size=6, collate_fn=bad))
    x = torch.cat([b["image"] for b in batches])
    y = torch.cat([b["label"] for b in batches])
    lx = torch.stack([local.test[i][0] for i in range(len(local.test))])
    assert torch.equal(x, lx) and y.tolist() == local.test.targets  # the bucket's bytes are the local bytes
    folder = load_data(s3_bucket("folder"), TINY)
    assert isinstance(folder.train, ImageFiles) and folder.num_classes == 3
    assert len(folder.test) == 12 and folder.test.sources[0].startswith("s3://datasets/photos/folder/val/class_0/")
    assert len(epoch(eval_dataset(folder.test))[0]) == 12


def test_run_files_on_a_bucket(s3_bucket):
    """`--storage s3://...`: the run's state file is written, read back and found for `--resume NAME`."""
    from pipeline.common.cli import UsageError
    from pipeline.common.runs import find_resume, read_run_file, write_run_file

    storage = s3_bucket("runs")
    write_run_file(storage, "run-1", "state.json", json.dumps({"status": "running", "epoch": 3}))
    assert json.loads(read_run_file(storage, "run-1", "state.json")) == {"status": "running", "epoch": 3}
    assert read_run_file(storage, "run-2", "state.json") is None
    assert find_resume(storage, "run-1", "state.json", "run") == ("run-1", {"status": "running", "epoch": 3})
    write_run_file(storage, "run-1", "state.json", json.dumps({"status": "finished"}))
    with pytest.raises(UsageError, match="already finished"):
        find_resume(storage, "run-1", "state.json", "run")


def test_worker_shards_fresh_each_epoch(photos):
    """How the supertraining's TorchTrainer hands the training set to two workers: Ray Train (V2) calls our
    ``data_config().configure(...)`` once and gives rank i the i-th iterator; here two threads play the workers
    (the real trainer and its worker processes run in the file-data tests)."""
    import threading

    from pipeline.common.batches import BadImages
    from pipeline.common.data import data_config, train_dataset

    s = load_data(str(photos[0]), TINY, search_fraction=0.0)
    ds = train_dataset(s.train, remote_args={"num_cpus": 0.5})
    shards = data_config().configure(datasets={"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    seen, errors = {}, []

    def worker(rank: int) -> None:
        try:
            bad = BadImages(cap=0)
            shard = shards[rank]["train"]
            for ep in range(2):
                labels = []
                for b in shard.iter_torch_batches(batch_size=4, drop_last=True, collate_fn=bad):
                    assert b["image"].shape == (4, 1, 16, 16)
                    labels.append(b["label"].tolist())
                # Sources are not in the torch batch; the order of labels and the shard's rows tell enough.
                rows = [str(r) for b in shard.iter_batches(batch_size=None) for r in b["source"]]
                seen[f"{rank}-{ep}"] = {"labels": labels, "rows": rows}
        except Exception as e:  # reported by the main thread
            errors.append(e)

    # A streaming split feeds its shards together: both "workers" consume at once, as the real ones do.
    threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert sorted(seen) == ["0-0", "0-1", "1-0", "1-1"]
    for k, v in seen.items():
        assert sum(len(b) for b in v["labels"]) == 4 * (len(s.train) // 2 // 4), k
    for rank in "01":  # each worker's shard comes in a new order every epoch (here: every pass)
        assert seen[f"{rank}-0"]["rows"] != seen[f"{rank}-1"]["rows"]
    for ep in "01":  # the two shards of one pass are disjoint and cover the split (less an uneven remainder)
        a, b = set(seen[f"0-{ep}"]["rows"]), set(seen[f"1-{ep}"]["rows"])
        assert not a & b and len(a | b) >= len(s.train) - 1
