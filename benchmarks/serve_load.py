"""Load on `pipeline.serve`: open-loop Poisson arrivals at rising rates, for the adaptive policy, always-largest and
always-smallest, against one server on 127.0.0.1.

    python benchmarks/serve_load.py                      # the newest finished search in ./mlflow.db
    python benchmarks/serve_load.py --rates 50,100,200 --duration 10 --slo-ms 20

One deployment serves all three policies: requests without a budget follow the SLO (adaptive); always-largest asks
for the most accurate rung (``budget=1x``), always-smallest for the smallest rung's GFLOPs. Per policy and rate:
throughput, p50/p99 latency seen by the client, SLO attainment (answered within the SLO; errors and timeouts
count as misses), and mean accuracy (the held-out top-1 of the subnet each request got). Also the idle overhead:
p50 of sequential requests against the largest rung's measured latency, and where the CPU goes: per request, the
replica's, HAProxy's, the client's and the rest of Ray's CPU time (read from /proc). Writes serve_load.md / .json /
.png under ``--out``. The client is one asyncio process beside the server: on a small machine they compete for
cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _image(in_chans: int, size: int) -> bytes:
    """One of scikit-learn's digits as a PNG (what a client would send)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits().images[0]
    img = Image.fromarray((d * 255 / 16).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    (img if in_chans == 1 else img.convert("RGB")).save(buf, "PNG")
    return buf.getvalue()


async def _load(url: str, body: bytes, rate: float, duration: float, most: int, slo_ms: float, top1: dict) -> dict:
    """Open loop: Poisson arrivals at ``rate`` for ``duration`` s (at most ``most`` requests); every request is sent
    at its arrival time whatever the earlier ones are doing."""
    import aiohttp

    rng = random.Random(0)
    results: list[tuple[float, int, str | None]] = []
    timeout = aiohttp.ClientTimeout(total=max(10.0, 50 * slo_ms / 1e3))

    async def one(session) -> None:
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body) as r:
                got = await r.json()
                results.append(((time.perf_counter() - t0) * 1e3, r.status, got.get("subnet")))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            results.append(((time.perf_counter() - t0) * 1e3, 0, None))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks, start, t = [], time.perf_counter(), 0.0
        while t < duration and len(tasks) < most:
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session)))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [r for r in results if r[1] == 200]
    lat = sorted(r[0] for r in results)
    return {
        "offered_rps": len(results) / sent_s,
        "throughput_rps": len(ok) / wall,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "slo_attainment": sum(1 for r in ok if r[0] <= slo_ms) / len(results),
        "mean_top1": statistics.fmean(top1[r[2]] for r in ok) if ok else float("nan"),
        "subnets": {s: sum(1 for r in ok if r[2] == s) / len(ok) for s in sorted({r[2] for r in ok})} if ok else {},
    }


CPU_GROUPS = ("replica", "haproxy", "client", "ray")


def _cpu_by_group() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and every process it started (the local Ray's included), by group: the
    serving replica, HAProxy, this process (the load's client, and the deployment's driver), the rest of Ray
    (controller, proxy, raylet, ...)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats, children = {}, {}
    for p in os.listdir("/proc"):
        try:
            if p.isdigit():
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                stats[int(p)] = fields
                children.setdefault(int(fields[1]), []).append(int(p))
        except OSError:
            continue
    me, out, todo = os.getpid(), {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid not in stats:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        group = (
            "client" if pid == me else "haproxy" if "haproxy" in cmd else "replica" if "ServeReplica" in cmd
            else "ray"
        )  # fmt: skip
        out[pid] = (group, (int(stats[pid][11]) + int(stats[pid][12])) / tick)
    return out


def _cpu_ms_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request, per group, between two `_cpu_by_group` readings."""
    per = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, t) in after.items():
        per[group] += t - before.get(pid, (group, 0.0))[1]
    return {g: 1e3 * v / max(1, requests) for g, v in per.items()}


def _plot(rows: list[dict], slo_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in ("adaptive", "largest", "smallest"):
        pts = [r for r in rows if r["policy"] == policy]
        x = [r["rate"] for r in pts]
        ax1.plot(x, [100 * r["slo_attainment"] for r in pts], marker="o", label=policy)
        ax2.plot(x, [r["mean_top1"] for r in pts], marker="o", label=policy)
    ax1.set(xlabel="offered load (requests/s)", ylabel=f"SLO attainment (%), SLO {slo_ms:g} ms", xscale="log")
    ax2.set(xlabel="offered load (requests/s)", ylabel="mean held-out top-1 of the subnets served (%)", xscale="log")
    rates = sorted({r["rate"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from pipeline.common.cli import quiet_libraries
    from pipeline.serve import ServeOptions, start
    from pipeline.serve.policy import Rung
    from pipeline.serve.policy import best as policy_best

    quiet_libraries(False)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search", default=None, help="search run id (default: the newest finished)")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--slo-ms", type=float, default=20.0)
    p.add_argument("--rates", default="25,50,100,200,300,400,600", help="offered loads, requests/s")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate and policy")
    p.add_argument("--max-requests", type=int, default=3000, help="most requests per rate and policy")
    p.add_argument("--mode", default="compiled", choices=("compiled", "packaged", "eager"))
    p.add_argument("--packages", default="serve_packages", help="folder of the packages (--mode packaged)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    server = start(
        ServeOptions(
            search=a.search,
            mlflow_uri=a.mlflow_uri,
            slo_ms=a.slo_ms,
            mode=a.mode,
            packages=a.packages,
            batch_sizes=a.batch_sizes,
            port=a.port,
            log_model=False,
        )
    )
    startup_s = time.perf_counter() - t0
    try:
        ladder = server.ladder
        top1 = {r["subnet"]: r["top1"] for r in ladder}
        # The rung the server's own ranking puts first (top-1, then faster, then cheaper).
        top = policy_best([Rung(r["subnet"], r["gflops"], r["top1"], r["latency_ms"]) for r in ladder])
        best = next(r for r in ladder if r["subnet"] == top.subnet)
        small = min(ladder, key=lambda r: r["gflops"])
        arch = server.source.model.arch
        body = _image(arch.in_chans, arch.img_size)
        base = f"{server.url}/predict"
        urls = {
            "adaptive": base,
            "largest": f"{base}?budget={best['gflops'] * 1e3 * 1.0001:.6f}MFLOPs",
            "smallest": f"{base}?budget={small['gflops'] * 1e3 * 1.0001:.6f}MFLOPs",
        }

        async def idle(gap_s: float) -> float:
            """p50 of 200 requests one at a time, ``gap_s`` apart (after 20 not counted)."""
            import aiohttp

            times = []
            async with aiohttp.ClientSession() as session:
                for _ in range(220):
                    t = time.perf_counter()
                    async with session.post(base, data=body) as r:
                        await r.read()
                    times.append((time.perf_counter() - t) * 1e3)
                    await asyncio.sleep(gap_s)
            return statistics.median(times[20:])

        # Back to back, and 20 ms apart: a quiet CPU answers a lone request more slowly (cold caches, idle states).
        idle_ms = {gap: asyncio.run(idle(gap / 1e3)) for gap in (0, 20)}
        rows = []
        for rate in [float(r) for r in a.rates.split(",")]:
            for policy, url in urls.items():
                before = _cpu_by_group()
                r = asyncio.run(_load(url, body, rate, a.duration, a.max_requests, a.slo_ms, top1))
                cpu = _cpu_ms_per_request(before, _cpu_by_group(), r["requests"])
                r |= {"policy": policy, "rate": rate, "largest_share": r["subnets"].get(best["subnet"], 0.0)}
                r |= {"cpu_ms_per_request": cpu}
                rows.append(r)
                print(
                    f"{rate:6.0f} req/s {policy:9s} thr {r['throughput_rps']:7.1f}  p50 {r['p50_ms']:7.2f} ms  "
                    f"p99 {r['p99_ms']:8.2f} ms  SLO {100 * r['slo_attainment']:5.1f} %  top-1 {r['mean_top1']:5.1f}  "
                    f"CPU ms/request " + " ".join(f"{g} {v:.2f}" for g, v in cpu.items()),
                    flush=True,
                )
    finally:
        server.stop()
    largest_ms = best["latency_ms"][min(best["latency_ms"])]
    lines = [
        f"Ladder ({a.mode}, batch sizes {a.batch_sizes}; replica start {startup_s:.0f} s, {os.cpu_count()} CPUs):",
        "",
        "| subnet | GFLOPs | held-out top-1 | latency (ms) per batch size |",
        "|---|---|---|---|",
    ]
    for r in ladder:
        per = ", ".join(f"{b}: {ms:.3g}" for b, ms in sorted(r["latency_ms"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['subnet']} | {r['gflops']:.4g} | {r['top1']:.1f} % | {per} |")
    lines += [
        "",
        f"Idle, through {server.ingress}: p50 of one request {idle_ms[0]:.2f} ms back to back, {idle_ms[20]:.2f} ms "
        f"20 ms apart; the largest rung's program {largest_ms:.3f} ms (target ≤ 1.5 × that + 5 ms = "
        f"{1.5 * largest_ms + 5:.2f} ms).",
        "",
        f"SLO {a.slo_ms:g} ms, open-loop Poisson arrivals, {a.duration:g} s per rate and policy:",
        "",
        "| offered (req/s) | policy | throughput (req/s) | p50 (ms) | p99 (ms) | SLO attainment | mean top-1 | "
        "largest rung's share | CPU ms per request: replica / HAProxy / client / rest of Ray |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = " / ".join(f"{r['cpu_ms_per_request'][g]:.2f}" for g in CPU_GROUPS)
        lines.append(
            f"| {r['offered_rps']:.0f} | {r['policy']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {100 * r['slo_attainment']:.1f} % | {r['mean_top1']:.1f} % | "
            f"{100 * r['largest_share']:.0f} % | {cpu} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    (out / "serve_load.md").write_text(text + "\n")
    record = {"ladder": ladder, "ingress": server.ingress, "startup_s": startup_s, "idle_p50_ms": idle_ms, "rows": rows}
    (out / "serve_load.json").write_text(json.dumps(record, indent=1))
    _plot(rows, a.slo_ms, out / "serve_load.png")


if __name__ == "__main__":
    main()
