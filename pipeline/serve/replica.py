"""One serving replica (a Ray Serve deployment): the ladder's programs, the batching and the HTTP interface.

At start the replica builds every rung's program for its device at each serving batch size (compiled as the
search measured them, AOTInductor packages loaded from disk and built where missing (`pipeline.serve.packages`),
or eager `FixedSubnet` modules; a compiled or packaged program holds its own copy of the weights it uses: freezing
folds them into its code) and takes each program's latency from the shared latency table, measuring (and adding)
what the table lacks on this hardware.
Requests are decoded as they arrive and batched by `serve.batch`; per batch, the requests with a budget of their
own run the most accurate rung within it, the others the rung `policy.slack_fit` picks for the slack left to the
batch's oldest request under the SLO.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from supervit import SubnetConfig, SuperViT

from ..search.latency import LatencySettings, whole_row
from .options import token_matches
from .packages import package_path, packaged_program, weights_digest
from .policy import BadRequest, Rung, parse_request_budget, slack_fit, within_budget

__all__ = ["ReplicaSpec", "LadderReplica", "rung_program", "build_ladder", "json_error"]


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs, picklable: the supernet, the ladder candidates, how to run and time them, the
    HTTP limits."""

    arch: dict
    num_classes: int
    state: Any  # the supernet's state dict; an ObjectRef of it once `start` has put it in the object store
    arch_key: str
    rungs: tuple  # (subnet, gflops, top1) per rung
    batch_sizes: tuple[int, ...]
    latency: LatencySettings
    slo_ms: float
    batch_wait_s: float
    max_request_bytes: int
    token: str | None
    full_gflops: float
    packages: str | None = None  # the folder of AOTInductor packages (mode ``packaged``)


@dataclass
class _Latency:
    """What `pipeline.search.latency.whole_row` reads of its context, for one batch size."""

    arch: Any
    num_classes: int
    arch_key: str
    table: Any
    latency: LatencySettings
    supernet: SuperViT

    def model(self, device: str = "cpu") -> SuperViT:
        return self.supernet


def rung_program(model: SuperViT, subnet: SubnetConfig, batch: int, mode: str, device, dtype):
    """A rung's program at ``batch``: compiled as the latency measurement compiles it (in inference mode, so the
    served batches, inference tensors, match its guards: a mismatch would compile it again, without frozen
    weights), the measurement's own program when it ran here; or the eager `FixedSubnet`."""
    from supervit import FixedSubnet, compiled_subnet

    if mode != "compiled":
        return FixedSubnet(model, subnet).to(device, dtype).eval()
    with torch.inference_mode():
        program, _ = compiled_subnet(model, subnet, device=device, dtype=dtype, batch_size=batch)
    return program


def build_ladder(spec: ReplicaSpec, model: SuperViT, table) -> tuple[list[Rung], dict]:
    """Every rung's program per batch size and its latency on this hardware (the table's, or measured and added).

    Returns:
        ``(ladder, programs)``: the rungs with their latencies, and ``programs[(subnet, batch)]`` callables.
    """
    lat = spec.latency
    threads = lat.threads or torch.get_num_threads()
    device, dtype = torch.device(lat.device), getattr(torch, lat.dtype)
    digest = weights_digest(model) if lat.mode == "packaged" else ""
    ladder, programs = [], {}
    for name, gf, top1 in spec.rungs:
        subnet = SubnetConfig.parse(name).validate(model.arch)
        ms = {}
        for b in spec.batch_sizes:
            ctx = _Latency(model.arch, spec.num_classes, spec.arch_key, table, dataclasses.replace(lat, batch=b), model)
            if lat.mode == "packaged":
                path = package_path(spec.packages, spec.arch_key, digest, name, b, device.type, lat.dtype, threads)
                program, seconds, built = packaged_program(model, subnet, b, device, dtype, path)
                row, _ = whole_row(ctx, subnet, threads, program=program, compile_s=seconds if built else 0.0)
            else:
                row, _ = whole_row(ctx, subnet, threads)
                program = rung_program(model, subnet, b, lat.mode, device, dtype)
            ms[b] = float(row["median_ms"])
            programs[(name, b)] = program
        ladder.append(Rung(name, gf, top1, ms))
    return ladder, programs


def json_error(status: int, message: str):
    """A one-line JSON error answer."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


class LadderReplica:
    """The deployment's class (wrapped by `serve.deployment` in `pipeline.serve.command`)."""

    def __init__(self, spec: ReplicaSpec, table) -> None:
        from supervit import ArchConfig
        from supervit.export import compiled_cache_size

        if spec.latency.device == "cpu" and spec.latency.threads:
            torch.set_num_threads(spec.latency.threads)  # what every program is compiled for and timed with
        self.spec = spec
        arch = ArchConfig.from_dict(spec.arch)
        model = SuperViT(arch, num_classes=spec.num_classes)
        import ray

        model.load_state_dict(ray.get(spec.state))
        self.device, self.dtype = torch.device(spec.latency.device), getattr(torch, spec.latency.dtype)
        self.model = model.to(self.device, self.dtype).eval()
        compiled_cache_size(max(8, len(spec.rungs) * len(spec.batch_sizes)))
        self.ladder, self.programs = build_ladder(spec, self.model, table)
        self.by_name = {r.subnet: r for r in self.ladder}
        self.run_batch.set_max_batch_size(max(spec.batch_sizes))
        self.run_batch.set_batch_wait_timeout_s(spec.batch_wait_s)
        self._warm_up()

    def _warm_up(self) -> None:
        """One image through every program, in a thread as requests run: the first request pays nothing (the
        transform's construction, a program's first call)."""
        import io
        import threading

        from PIL import Image

        from supervit.data.transforms import load_image

        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, "PNG")
        arch = self.model.arch
        x = load_image(png.getvalue(), arch.img_size, arch.in_chans, train=False)

        def run() -> None:
            for rung in self.ladder:
                for b in rung.latency_ms:
                    self._forward(rung, x.expand(b, *x.shape))

        t = threading.Thread(target=run)
        t.start()
        t.join()

    # ------------------------------------------------------------------------------------------ HTTP

    async def __call__(self, request):
        arrived = time.perf_counter()
        if self.spec.token is not None and not token_matches(request.headers.get("authorization"), self.spec.token):
            return json_error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        path = request.url.path.rstrip("/") or "/"
        if path == "/subnets":
            return self._subnets() if request.method == "GET" else json_error(405, "GET /subnets lists the ladder")
        if path != "/predict":
            return json_error(404, f"no {path}: POST /predict (an image as the body) or GET /subnets")
        if request.method != "POST":
            return json_error(405, "POST an image's bytes to /predict")
        try:
            budget = parse_request_budget(dict(request.query_params), self.spec.full_gflops)
            rung = None if budget is None else within_budget(self.ladder, budget)
            x = await self._image(request)
        except BadRequest as e:
            return json_error(e.status, str(e))
        answer = await self.run_batch((x, arrived, rung))
        from starlette.responses import JSONResponse

        return JSONResponse(answer | {"latency_ms": (time.perf_counter() - arrived) * 1e3})

    async def _image(self, request) -> torch.Tensor:
        """The request body decoded and prepared as the held-out images are (resize, centre crop, normalise)."""
        from supervit.data import DataError
        from supervit.data.transforms import load_image

        limit = self.spec.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"the body is {int(declared)} bytes, over the limit of {limit}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(f"the body is over the limit of {limit} bytes", 413)
        if not body:
            raise BadRequest("the body is empty: POST an image's bytes (JPEG, PNG, WebP, GIF)")
        arch = self.model.arch
        try:
            # On the event loop: a small image decodes in well under a millisecond, less than a hop to a thread
            # (decoding in a thread cut the throughput this machine sustains from about 200 to about 80 req/s). A
            # large image holds up the other requests while it decodes: --max-request-mb bounds that.
            return load_image(bytes(body), arch.img_size, arch.in_chans, train=False)
        except DataError as e:
            raise BadRequest(f"the body is not an image this server reads (JPEG, PNG, WebP, GIF): {e}") from None

    def _subnets(self):
        from starlette.responses import JSONResponse

        return JSONResponse(
            {
                "slo_ms": self.spec.slo_ms,
                "mode": self.spec.latency.mode,
                "subnets": [
                    {
                        "subnet": r.subnet,
                        "gflops": r.gflops,
                        "top1": r.top1,
                        "latency_ms": {str(b): ms for b, ms in sorted(r.latency_ms.items())},
                    }
                    for r in sorted(self.ladder, key=lambda r: r.gflops)
                ],
            }
        )

    def describe(self) -> list[dict]:
        """The ladder as measured on this replica (for the serving run's record)."""
        return [dataclasses.asdict(r) | {"latency_ms": dict(r.latency_ms)} for r in self.ladder]

    # ------------------------------------------------------------------------------------------ batches

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)  # both set from the spec at start
    async def run_batch(self, items: list[tuple[torch.Tensor, float, Rung | None]]) -> list[dict]:
        """A batch of (image, arrival, rung or None: the SLO's); answers in order. Wrapped by `serve.batch`."""
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[tuple[torch.Tensor, float, Rung | None]]) -> list[dict]:
        answers: list[dict | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, (_, _, rung) in enumerate(items):
            groups.setdefault(None if rung is None else rung.subnet, []).append(i)
        # Requests with a budget of their own first; the SLO's group then gets the slack left after them.
        for name in sorted(groups, key=lambda k: k is None):
            idx = groups[name]
            if name is None:
                oldest = min(items[i][1] for i in idx)
                slack = self.spec.slo_ms - (time.perf_counter() - oldest) * 1e3
                rung = slack_fit(self.ladder, len(idx), slack)
            else:
                rung = self.by_name[name]
            probs = self._forward(rung, torch.stack([items[i][0] for i in idx]))
            top = probs.topk(min(5, probs.shape[1]), dim=1)
            for row, i in enumerate(idx):
                answers[i] = {
                    "label": int(top.indices[row, 0]),
                    "top5": [[int(c), float(p)] for c, p in zip(top.indices[row], top.values[row], strict=True)],
                    "subnet": rung.subnet,
                    "gflops": rung.gflops,
                    "batch": len(idx),
                }
        return answers  # type: ignore[return-value]

    @torch.inference_mode()
    def _forward(self, rung: Rung, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``x`` by ``rung``'s programs (a batch padded up to a program's size)."""
        n, out = len(x), []
        b = rung.batch_for(n)
        for start in range(0, n, b):
            chunk = x[start : start + b]
            # A fresh buffer of the program's shape: padding, and the strides the program was compiled for (a
            # size-1 dimension of a transformed image can carry any stride, and a compiled program guards on it).
            buf = torch.zeros((b, *x.shape[1:]), device=self.device, dtype=self.dtype)
            buf[: len(chunk)] = chunk
            out.append(self.programs[(rung.subnet, b)](buf).float()[: len(chunk)])
        return torch.cat(out).softmax(dim=1).cpu()
