"""Input pipeline at two dataset sizes: throughput of Ray Data against a DataLoader, and peak memory.

    python benchmarks/input_pipeline.py --n 1000 --workdir /tmp/input_bench

Generates an ImageNet-like folder (JPEGs around 500x375, ``--classes`` classes: crops of scikit-learn's two
photographs, resized, colour-shifted and noised, quality 90 -- about ImageNet's bytes per image) and its
Parquet twin, at N and 4N images, then measures, each in a fresh process (peak RSS is per process):

- images/s per CPU core of the train input (decode + DeiT augmentation at 224, ``--cpus`` cores): the Ray
  Data pipeline (folder and Parquet) against a ``torch.utils.data.DataLoader`` over the same files with the
  same timm transform (``--cpus`` loader workers). Target: Ray Data >= 0.9x the DataLoader.
- peak RSS of the driver and of each training worker of a ``TorchTrainer`` (2 workers iterating their
  dataset shard for ``--epochs`` epochs, no model work), at N and 4N. Target: 4N / N <= 1.2.
- peak RSS of a search driver that iterates the held-out split twice (two trials), at N and 4N, streamed
  (`pipeline.common.data.eval_dataset`) and, for contrast, stacked whole in memory as the search did before.

Peak RSS is the kernel's high-water mark (``VmHWM`` in ``/proc/<pid>/status``, read by the process itself at
the end); "anon" is the peak of ``RssAnon`` sampled every 20 ms, i.e. without the object store's shared pages
that a process maps when it reads blocks zero-copy. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; the children and Ray's workers get it via PYTHONPATH


# ------------------------------------------------------------------------------------------ memory


def _status(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/status`` memory fields in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakMemory:
    """Samples this process's ``RssAnon`` in a thread; `report` adds the kernel's ``VmHWM``."""

    def __init__(self, every_s: float = 0.02):
        self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, _status().get("RssAnon", 0))
            time.sleep(every_s)

    def report(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        s = _status()
        self.anon = max(self.anon, s.get("RssAnon", 0))
        return {"hwm_mb": s["VmHWM"] / 2**20, "anon_mb": self.anon / 2**20}


# ------------------------------------------------------------------------------------------ data


def make_images(root: Path, n: int, classes: int, seed: int = 0) -> None:
    """``n`` train JPEGs (``root/train/c_XXX/NNNNNN.jpg``, class ``i % classes``) and ``n // 10`` val JPEGs.

    Content: a random crop of one of the two photos, colour-shifted per class, resized to 500x375, plus noise
    (about ImageNet's ~110 KB per image at quality 90)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    shifted = {}  # (class) -> colour-shifted photo, made once
    noise = [rng.normal(0, 6, (375, 500, 3)).astype(np.int16) for _ in range(8)]
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            c = i % classes
            if c not in shifted:
                shift = rng.uniform(0.7, 1.3, size=3)
                shifted[c] = Image.fromarray(np.clip(photos[c % 2] * shift, 0, 255).astype(np.uint8))
            img = shifted[c]
            h, w = img.height, img.width
            ch = int(rng.integers(h // 2, h + 1))
            cw = min(w, int(ch * rng.uniform(1.0, 1.5)))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = np.asarray(img.resize((500, 375), Image.BILINEAR, box=(x, y, x + cw, y + ch)), np.int16)
            out = Image.fromarray(np.clip(crop + noise[i % 8], 0, 255).astype(np.uint8))
            d = root / split / f"c_{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            out.save(d / f"{i:06d}.jpg", "JPEG", quality=90)


def make_dataset(big: Path, root: Path, n: int) -> tuple[Path, Path, Path]:
    """The first ``n`` train images of the ``big`` folder (hard links) plus all of its val, and two Parquet
    twins (``{train,test}-*.parquet``, rows shuffled): ``root/parquet`` with row groups of 64 rows, as Hugging
    Face writes them, and ``root/parquet_onegroup`` written with pyarrow's defaults (``pq.write_table(table,
    path)``: one row group per file below a million rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, pq_dir, one_dir = root / "folder", root / "parquet", root / "parquet_onegroup"
    if (root / "done").exists():
        return folder, pq_dir, one_dir
    rows: dict[str, list[tuple[bytes, int]]] = {"train": [], "val": []}
    for split in ("train", "val"):
        for f in sorted((big / split).rglob("*.jpg")):
            if split == "train" and int(f.stem) >= n:
                continue
            dst = folder / f.relative_to(big)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(f, dst)
            rows[split].append((f.read_bytes(), int(f.parent.name[2:])))
    pq_dir.mkdir(parents=True, exist_ok=True)
    one_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, name in (("train", "train-00000-of-00001"), ("val", "test-00000-of-00001")):
        items = rows[split]
        order = rng.permutation(len(items))
        table = pa.table(
            {
                "image": pa.array([items[i][0] for i in order], pa.binary()),
                "label": pa.array([items[i][1] for i in order], pa.int64()),
            }
        )
        pq.write_table(table, pq_dir / f"{name}.parquet", row_group_size=64)
        pq.write_table(table, one_dir / f"{name}.parquet")
    (root / "done").write_text("")
    return folder, pq_dir, one_dir


def _disk_read_bytes() -> int:
    """Bytes read from the block devices since boot (``/proc/diskstats``: sectors of 512 bytes)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if not parts[2].startswith(("loop", "ram")) and not parts[2][-1].isdigit():  # whole disks only
                total += int(parts[5]) * 512
    return total


def _evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache, so their next read goes to storage (and shows in `_disk_read_bytes`)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class DecodeMemory:
    """Samples ``RssAnon`` of every Ray Data task process (its title names the operator) in a thread."""

    def __init__(self, every_s: float = 0.05):
        self.anon: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"MapBatches" not in f.read():
                            continue
                    self.anon[int(pid)] = max(self.anon.get(int(pid), 0), _status(pid).get("RssAnon", 0))
                except OSError:
                    continue

    def peak_mb(self) -> float:
        self._stop.set()
        return max(self.anon.values(), default=0) / 2**20


# ------------------------------------------------------------------------------------------ phases


def _init_ray(cpus: int, store_mb: int) -> None:
    import ray
    import ray.data

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=store_mb * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _splits(data: str, held_out: float):
    from supervit.config import get_arch
    from supervit.data import DEIT_AUGMENT, load_data

    s = load_data(data, get_arch("deit_s"), search_fraction=held_out)
    s.train = s.train.with_augment(DEIT_AUGMENT)
    return s


def phase_throughput(a) -> dict:
    """DataLoader, Ray Data on the folder, Ray Data on Parquet: one epoch each, in turn, ``--rounds`` rounds
    (the machine's load drifts: taking turns exposes each path to the same drift); the first round warms up
    (Ray's workers import torch and timm), the median of the others is reported."""
    import torch

    from pipeline.common.batches import BadImages
    from pipeline.common.data import train_dataset

    torch.set_num_threads(1)
    _init_ray(a.cpus, a.store_mb)
    folder, pq_dir, one_dir = a.data.split(",")
    s, p, o = _splits(folder, a.held_out), _splits(pq_dir, a.held_out), _splits(one_dir, a.held_out)
    loader = torch.utils.data.DataLoader(s.train, batch_size=a.batch, shuffle=True, num_workers=a.cpus, drop_last=True)
    bad = BadImages(cap=0)

    def ray_epoch(ds):
        return (len(b["label"]) for b in ds.iter_torch_batches(batch_size=a.batch, drop_last=True, collate_fn=bad))

    ds_folder, ds_parquet, ds_one = train_dataset(s.train), train_dataset(p.train), train_dataset(o.train)
    runs = {
        "dataloader": lambda: (len(y) for _, y in loader),
        "raydata": lambda: ray_epoch(ds_folder),
        "raydata_parquet": lambda: ray_epoch(ds_parquet),
        "raydata_parquet_onegroup": lambda: ray_epoch(ds_one),
    }
    files = {"raydata_parquet": sorted(Path(pq_dir).glob("*.parquet")), "raydata_parquet_onegroup": []}
    files["raydata_parquet_onegroup"] = sorted(Path(one_dir).glob("*.parquet"))
    rates: dict[str, list[float]] = {k: [] for k in runs}
    reads: dict[str, list[int]] = {k: [] for k in files}
    for _ in range(max(2, a.rounds)):
        for k, epoch in runs.items():
            if k in files:
                _evict(files[k])
                before = _disk_read_bytes()
            t0 = time.perf_counter()
            seen = sum(epoch())
            rates[k].append(seen / (time.perf_counter() - t0))
            if k in files:
                reads[k].append(_disk_read_bytes() - before)
    out = {k: {"img_s": float(np.median(v[1:])), "all": v} for k, v in rates.items()}
    for k, v in reads.items():  # the train split's files: what one epoch could read at least
        size = sum(f.stat().st_size for f in files[k] if f.name.startswith("train"))
        out[k] |= {"read_bytes": float(np.median(v[1:])), "train_file_bytes": size}
    return out


def phase_trainer(a) -> dict:
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.common.batches import BadImages
    from pipeline.common.data import data_config, train_dataset
    from supervit.data import verify

    _init_ray(a.cpus + 1, a.store_mb)  # + 1 logical CPU: the two workers' half CPUs
    folder, pq_dir = a.data.split(",")
    s, p = _splits(folder, a.held_out), _splits(pq_dir, a.held_out)
    verify(p)  # the supertraining driver's start-up check: its first images, decoded
    decode = DecodeMemory()
    out = Path(a.out).with_suffix(".workers")
    out.mkdir(parents=True, exist_ok=True)
    epochs, batch = a.epochs, a.batch

    def loop(config):
        mem = PeakMemory()
        rank = ray.train.get_context().get_world_rank()
        bad, seen = BadImages(cap=0), 0
        for name in ("folder", "parquet"):  # one worker group, both formats: Ray Train starts slowly here
            shard = ray.train.get_dataset_shard(name)
            for _ in range(epochs):
                for b in shard.iter_torch_batches(batch_size=batch, drop_last=True, collate_fn=bad):
                    seen += len(b["label"])
        (out / f"{rank}.json").write_text(json.dumps({**mem.report(), "rows": seen}))

    t0 = time.perf_counter()
    TorchTrainer(
        loop,
        datasets={"folder": train_dataset(s.train), "parquet": train_dataset(p.train)},
        dataset_config=data_config(),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="input_bench", storage_path=str(out.parent / "runs")),
    ).fit()
    workers = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    return {
        "workers": workers,
        "train_size": len(s.train),
        "fit_s": time.perf_counter() - t0,
        "decode_anon_mb": decode.peak_mb(),
    }


def phase_search(a) -> dict:
    from pipeline.common.batches import BadImages
    from pipeline.common.data import eval_dataset

    _init_ray(a.cpus, a.store_mb)
    s = _splits(a.data, a.search_held_out)
    ds = eval_dataset(s.search)
    seen = 0
    for _trial in range(2):
        for b in ds.iter_torch_batches(batch_size=a.batch, collate_fn=BadImages(cap=0)):
            seen += len(b["label"])
    return {"rows": seen, "held_out": len(s.search)}


def phase_stack(a) -> dict:
    """What the search did before streaming: decode the whole held-out split into one tensor in the driver."""
    import torch

    s = _splits(a.data, a.search_held_out)
    loader = torch.utils.data.DataLoader(s.search, batch_size=a.batch, num_workers=a.cpus)
    xs, ys = zip(*loader, strict=True)
    x = torch.cat(xs)
    return {"rows": len(x), "held_out": len(s.search)}


PHASES = {
    "throughput": phase_throughput,
    "trainer": phase_trainer,
    "search": phase_search,
    "stack": phase_stack,
}


def run_phase(a) -> None:
    mem = PeakMemory()
    result = PHASES[a.phase](a)
    result["driver"] = mem.report()
    Path(a.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ driver


def child(a, phase: str, data: Path | str, tag: str) -> dict:
    out = Path(a.workdir) / "results" / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--out", str(out)]
    for k in ("cpus", "batch", "epochs", "rounds", "store_mb", "held_out", "search_held_out"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if a.quiet else None)
    res = json.loads(out.read_text())
    print(f"  {tag}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500, help="images in train/ of the small dataset (the big one: 4N)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workdir", default="/tmp/supervit_input_bench")
    p.add_argument("--cpus", type=int, default=2, help="cores for decoding (Ray CPUs / DataLoader workers)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1, help="epochs of each format per training worker")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds; the first is a warm-up")
    p.add_argument("--store-mb", type=int, default=1024, help="Ray object store size")
    p.add_argument("--held-out", type=float, default=0.2, help="search split fraction of train/ (training runs)")
    p.add_argument(
        "--search-held-out", type=float, default=0.5, help="search split fraction of train/ for the search runs"
    )
    p.add_argument("--quiet", action="store_true", help="hide the children's logs")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        return run_phase(a)

    t0 = time.perf_counter()
    work = Path(a.workdir)
    big = work / f"images_{4 * a.n}_{a.classes}"
    if not (big / "done").exists():
        make_images(big, 4 * a.n, a.classes)
        (big / "done").write_text("")
    data = {tag: make_dataset(big, work / f"data_{n}", n) for tag, n in (("N", a.n), ("4N", 4 * a.n))}
    print(f"datasets ready: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    layouts = {"small": 1, "onegroup": 2}  # Parquet twin: row groups of 64, or one row group per file

    r = {"tp": child(a, "throughput", ",".join(map(str, data["N"])), "throughput_N")}
    for tag in ("N", "4N"):
        for lay, i in layouts.items():
            r[f"tr_{lay}_{tag}"] = child(a, "trainer", f"{data[tag][0]},{data[tag][i]}", f"trainer_{lay}_{tag}")
        r[f"se_{tag}"] = child(a, "search", data[tag][0], f"search_{tag}")
        r[f"st_{tag}"] = child(a, "stack", data[tag][0], f"stack_{tag}")

    cores = a.cpus
    lines = [
        f"N = {a.n} train/ images ({a.classes} classes, 500x375 JPEG q90), 4N = {4 * a.n}; training runs: train "
        f"split {1 - a.held_out:.0%} of them; search runs: held-out split {a.search_held_out:.0%}; batch {a.batch}; "
        f"{cores} decode cores; DeiT augmentation (RandAugment m9, erasing 0.25) at 224; "
        f"total {time.perf_counter() - t0:.0f} s",
        "",
        "| train input at N: decode + DeiT augmentation | img/s | img/s per core | vs DataLoader | per round "
        "| read from storage per epoch / train files |",
        "|---|---|---|---|---|---|",
    ]
    tp = r["tp"]
    dl = tp["dataloader"]["img_s"]
    for name, key in (
        ("DataLoader, folder (timm transform)", "dataloader"),
        ("Ray Data, folder", "raydata"),
        ("Ray Data, Parquet, row groups of 64", "raydata_parquet"),
        ("Ray Data, Parquet, one row group per file", "raydata_parquet_onegroup"),
    ):
        v = tp[key]["img_s"]
        rounds = ", ".join(f"{x:.0f}" for x in tp[key]["all"])
        read = ""
        if "read_bytes" in tp[key]:
            mb, size = tp[key]["read_bytes"] / 2**20, tp[key]["train_file_bytes"] / 2**20
            read = f"{mb:.0f} MB / {size:.0f} MB = {mb / size:.2f}x"
        lines.append(f"| {name} | {v:.0f} | {v / cores:.0f} | {v / dl:.2f}x | {rounds} | {read} |")
    one, small = tp["raydata_parquet_onegroup"]["img_s"], tp["raydata_parquet"]["img_s"]
    lines += ["", f"one row group per file against row groups of 64: {one / small:.2f}x the img/s"]
    lines += ["", "| peak RSS, MB: VmHWM (anon) | N | 4N | 4N / N |", "|---|---|---|---|"]

    def row(label: str, key: str, get) -> str:
        n, n4 = get(r[f"{key}_N"]), get(r[f"{key}_4N"])
        ratio = f"{n4[0] / n[0]:.2f} ({n4[1] / n[1]:.2f})" if n[0] else f"- ({n4[1] / n[1]:.2f})"
        return f"| {label} | {n[0]:.0f} ({n[1]:.0f}) | {n4[0]:.0f} ({n4[1]:.0f}) | {ratio} |"

    def driver(x):
        return x["driver"]["hwm_mb"], x["driver"]["anon_mb"]

    def worker(i):
        return lambda x: (x["workers"][i]["hwm_mb"], x["workers"][i]["anon_mb"])

    def decode(x):
        return 0.0, x["decode_anon_mb"]

    for lay, text in (("small", "row groups of 64"), ("onegroup", "one row group per file")):
        lines.append(row(f"TorchTrainer driver (start-up check on Parquet, {text})", f"tr_{lay}", driver))
        lines += [
            row(f"TorchTrainer worker {i} (folder, then Parquet, {text})", f"tr_{lay}", worker(i)) for i in range(2)
        ]
        lines.append(row(f"decode processes, largest (anon only; Parquet, {text})", f"tr_{lay}", decode))
    lines.append(row("search driver, streamed eval_dataset (2 trials)", "se", driver))
    lines.append(row("search driver, split stacked in memory (before)", "st", driver))
    rows = (r["tr_small_N"]["workers"][0]["rows"], r["tr_small_4N"]["workers"][0]["rows"])
    held = (r["se_N"]["held_out"], r["se_4N"]["held_out"])
    lines += [
        "",
        f"rows per worker (both formats, {a.epochs} epochs): {rows[0]} at N, {rows[1]} at 4N; "
        f"held-out split: {held[0]} images at N, {held[1]} at 4N",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
