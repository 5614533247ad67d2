"""What a deployment serves, read from the MLflow store before Ray starts: a finished search's supernet and the
subnets of its Pareto front (with every budget's answer), each with its GFLOPs and held-out top-1.

The front is taken over every trial of every budget of the search: the subnets no other trial beats on both
held-out top-1 and the latency the search measured. Each budget's answer joins it (a user asked for that budget).
Latency per serving batch size is measured on the replica (`pipeline.serve.replica`), not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from supervit import SubnetConfig, SuperViT, gflops

from ..common.cli import UsageError
from ..common.runs import STAGE_TAG, check_mlflow, newest_finished_run

__all__ = ["LadderSource", "find_search_run", "load_ladder_source", "thin"]


@dataclass
class LadderSource:
    """A finished search's supernet and ladder candidates (``rungs``: subnet, gflops, top1, search_latency_ms,
    test_top1 where the subnet is an answer, the budgets it answers ("0.25x, 0.5x"), or empty)."""

    search_run_id: str
    supertrain_run_id: str | None
    checkpoint: Path
    model: SuperViT
    rungs: list[dict]
    search_params: dict = field(default_factory=dict)


def find_search_run(tracking_uri: str, run_id: str | None):
    """The search run ``run_id``, or the newest finished search in the store.

    Raises:
        UsageError: no store, no such run, or no finished search.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        raise UsageError(
            f"the MLflow store {tracking_uri} does not exist: run `python -m pipeline.supertrain` and "
            "`python -m pipeline.search` first, or pass --mlflow-uri"
        )
    check_mlflow(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UsageError(f"no MLflow run {run_id!r} in {tracking_uri}") from None
        if run.data.tags.get(STAGE_TAG) != "search":
            raise UsageError(f"MLflow run {run_id} is not a search (its stage: {run.data.tags.get(STAGE_TAG)})")
        if run.info.status != "FINISHED":
            raise UsageError(f"search run {run_id} has not finished (status {run.info.status})")
        return run
    run = newest_finished_run(tracking_uri, "search")
    if run is None:
        raise UsageError(
            f"no finished search run in the MLflow store {tracking_uri}: run `python -m pipeline.search "
            "--budget 0.5x` first, or pass --search RUN_ID"
        )
    return run


def _front(rows: list[dict]) -> list[dict]:
    """One row per subnet (its best latency source), then the subnets on the (top-1 up, latency down) front."""
    from pipeline.search.select import pareto_front

    per_subnet: dict[str, dict] = {}
    for r in rows:
        old = per_subnet.get(r["subnet"])
        # Measured whole beats predicted: the search measured its front and answers whole.
        if old is None or (old.get("latency_source") != "measured" and r.get("latency_source") == "measured"):
            per_subnet[r["subnet"]] = r
    unique = list(per_subnet.values())
    flags = pareto_front([(r["top1"], r["latency_ms"]) for r in unique])
    return [r for r, on in zip(unique, flags, strict=True) if on]


def thin(rungs: list[dict], most: int) -> list[dict]:
    """At most ``most`` rungs (more only when more budgets' answers must stay), spread evenly in GFLOPs between the
    cheapest and the dearest; every budget's answer (``budget`` set), the cheapest and the most accurate stay."""
    rungs = sorted(rungs, key=lambda r: r["gflops"])
    if len(rungs) <= most:
        return rungs
    best = max(range(len(rungs)), key=lambda i: (rungs[i]["top1"], -rungs[i]["gflops"]))
    keep = {i for i, r in enumerate(rungs) if r.get("budget")} | {best}
    if most > 1:
        keep.add(0)
    lo, hi = rungs[0]["gflops"], rungs[-1]["gflops"]
    for k in range(most):
        if len(keep) >= most:
            break
        target = lo + (hi - lo) * k / max(1, most - 1)
        nearest = min(range(len(rungs)), key=lambda i: abs(rungs[i]["gflops"] - target))
        if nearest not in keep:
            keep.add(nearest)
    return [rungs[i] for i in sorted(keep)]


def load_ladder_source(tracking_uri: str, run_id: str | None, workdir: Path, max_rungs: int) -> LadderSource:
    """The supernet and ladder candidates of search ``run_id`` (None: the newest finished search).

    Raises:
        UsageError: no such search, or one without a Pareto front, or whose checkpoint cannot be found.
    """
    import mlflow
    import pyarrow.parquet as pq
    from mlflow.exceptions import MlflowException

    from pipeline.search.plan import resolve_checkpoint
    from supervit import load_checkpoint

    run = find_search_run(tracking_uri, run_id)
    rid, tags, params = run.info.run_id, run.data.tags, run.data.params
    try:
        front_file = mlflow.artifacts.download_artifacts(
            run_id=rid, artifact_path="pareto.parquet", tracking_uri=tracking_uri, dst_path=str(workdir)
        )
        chosen_file = mlflow.artifacts.download_artifacts(
            run_id=rid, artifact_path="chosen.json", tracking_uri=tracking_uri, dst_path=str(workdir)
        )
    except (MlflowException, OSError):
        raise UsageError(f"search run {rid} has no Pareto front (pareto.parquet, chosen.json) to serve") from None
    rows = pq.read_table(front_file).to_pylist()
    chosen = json.loads(Path(chosen_file).read_text())
    if not rows:
        raise UsageError(f"search run {rid} has an empty Pareto front")
    supertrain = tags.get("supertrain_run_id") or None
    spec = supertrain or (params.get("checkpoint") if params.get("checkpoint") not in (None, "None") else None)
    if spec is None:
        raise UsageError(f"search run {rid} names no checkpoint or supertraining run")
    checkpoint, _ = resolve_checkpoint(spec, tracking_uri, workdir)
    model = load_checkpoint(checkpoint).eval()
    arch, n = model.arch, model.num_classes
    answers = {c["subnet"]: c for c in chosen}
    budgets: dict[str, list[str]] = {}
    for c in chosen:
        budgets.setdefault(c["subnet"], []).append(c["budget"])
    candidates = {r["subnet"]: r for r in _front(rows)}
    for name, c in answers.items():
        candidates.setdefault(name, c)
    rungs = []
    for name, r in candidates.items():
        subnet = SubnetConfig.parse(name).validate(arch)
        answer = answers.get(name, {})
        rungs.append(
            {
                "subnet": subnet.name,
                "gflops": gflops(arch, subnet, n),
                "top1": float(r["top1"]),
                "search_latency_ms": float(r["latency_ms"]),
                "test_top1": answer.get("test_top1"),  # None where the subnet answers no budget
                "budget": ", ".join(budgets.get(name, [])),  # every budget it answers (one subnet may answer several)
            }
        )
    return LadderSource(rid, supertrain, Path(checkpoint), model, thin(rungs, max_rungs), dict(params))
