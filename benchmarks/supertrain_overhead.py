"""Ray Train overhead of `pipeline.supertrain`: images/s of its worker against a bare PyTorch loop, in one run.

    python benchmarks/supertrain_overhead.py [--epochs 4] [--cpus 2] [--data digits] [--preset tiny]

Both paths train the same model on the same data with the default run's options
(`SupertrainOptions().resolved()`) and the same torch thread count:
  bare: this process, without Ray: the worker's own objects (`pipeline.supertrain.worker.make_worker`) and epoch
        (`supervit.train_one_epoch`, then `evaluate_worker` as the worker evaluates), timed the same way.
  ray:  `supertrain(workers=1)` on a local Ray started with ``--cpus`` CPUs (the worker then gets all of
        them and calls ``torch.set_num_threads(cpus)``); images/s and epoch times read back from MLflow.
The bare loop runs before and after the Ray run (other load on the machine shows as a gap between the two);
the first epoch of each is warm-up and left out of the median. Target: ray / bare >= 0.95, bare being the
mean of the two bare medians. Run it on an otherwise idle machine: it starts its own Ray (RAY_ADDRESS is ignored),
and fails if another Ray cluster runs on the machine (ray.init would join it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.common.runs import init_ray  # noqa: E402
from pipeline.supertrain import SupertrainOptions, supertrain  # noqa: E402
from pipeline.supertrain.worker import evaluate_worker, make_worker  # noqa: E402
from supervit import train_one_epoch  # noqa: E402


def proc_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU-seconds of it and its reaped children) for every process on the machine."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            st = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d.name)] = (int(st[1]), sum(map(int, st[11:15])) / os.sysconf("SC_CLK_TCK"))
    return out


def others_cpu(before: dict, after: dict) -> float:
    """CPU-seconds used between two `proc_cpu` snapshots by processes that are not this one or its
    descendants (Ray's processes are): other people's work on a shared machine."""
    ours, todo = set(), [os.getpid()]
    while todo:
        ours.add(pid := todo.pop())
        todo += [c for c, (ppid, _) in after.items() if ppid == pid]
    return sum(cpu - before.get(pid, (0, 0.0))[1] for pid, (_, cpu) in after.items() if pid not in ours)


def bare_loop(opts: SupertrainOptions, threads: int) -> list[tuple[float, float]]:
    """(epoch seconds, images/s) per epoch of the worker's training loop, run here without Ray."""
    w = make_worker(dataclasses.replace(opts, cpus_per_worker=threads))
    rows = []
    for _ in range(opts.epochs):
        stats = train_one_epoch(w.model, w.loader, w.sampler, w.training)
        rows.append((stats.seconds, stats.images / stats.seconds))
        evaluate_worker(w, opts, last=False)  # as the worker does, outside the timing
    return rows


def ray_run(opts: SupertrainOptions, tmp: str) -> list[tuple[float, float]]:
    """(epoch seconds, images/s) per epoch as the Ray Train worker logged them to MLflow."""
    import mlflow

    uri = f"sqlite:///{tmp}/mlflow.db"
    opts = dataclasses.replace(opts, storage=f"{tmp}/ray", mlflow_uri=uri, name="overhead", workers=1)
    res = supertrain(opts)
    client = mlflow.MlflowClient(uri)

    def hist(key):
        return [m.value for m in sorted(client.get_metric_history(res.run_id, key), key=lambda m: m.step)]

    return list(zip(hist("epoch_time_s"), hist("images_per_s"), strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray = torch threads")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default="digits")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is warm-up)")
    os.environ.pop("RAY_ADDRESS", None)
    opts = SupertrainOptions(preset=args.preset, data=args.data, epochs=args.epochs).resolved()

    table = [
        f"{opts.preset} on {opts.data}, batch {opts.batch_size}, {args.epochs} epochs, {args.cpus} CPUs / threads, "
        f"load average before the run {os.getloadavg()[0]:.2f}\n",
        "| path | median img/s (epochs 2+) | epoch times (s) | total wall (s) | other processes' CPU (% of a core) |",
        "|---|---|---|---|---|",
    ]
    med = {}
    for name in ("bare", "ray", "bare again"):
        t0, cpu0 = time.perf_counter(), proc_cpu()
        if name == "ray":
            with tempfile.TemporaryDirectory() as tmp:
                init_ray(None, num_cpus=args.cpus)  # supertrain reuses it; its worker gets all --cpus CPUs
                rows = ray_run(opts, tmp)
                cpu1 = proc_cpu()  # before Ray's processes go
                ray.shutdown()  # the second bare loop runs without Ray
        else:
            rows = bare_loop(opts, threads=args.cpus)
            cpu1 = proc_cpu()
        wall = time.perf_counter() - t0
        med[name] = statistics.median(ips for _, ips in rows[1:])
        times = " ".join(f"{t:.2f}" for t, _ in rows)
        table.append(f"| {name} | {med[name]:.1f} | {times} | {wall:.1f} | {100 * others_cpu(cpu0, cpu1) / wall:.0f} |")
        print("done:", table[-1], flush=True)
    ratio = med["ray"] / ((med["bare"] + med["bare again"]) / 2)
    print("", *table, f"\nray / bare = {ratio:.3f} (target >= 0.95: {'ok' if ratio >= 0.95 else 'MISSED'})", sep="\n")
    print("ray wall includes starting Ray, the final all-cell evaluation and MLflow model logging;")
    print("other processes' CPU: of processes outside this one's tree (well above 0: the numbers are suspect)")


if __name__ == "__main__":
    main()
