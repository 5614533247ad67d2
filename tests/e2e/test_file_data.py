"""Both commands on file-backed data, streamed through Ray Data into the workers and trials: an ImageFolder of
real photographs (with undecodable files among them) and its Parquet twin in an S3 bucket (moto, 127.0.0.1); the
search predicts latency from compiled parts, measures its answer whole as deployed, and reports both."""

import dataclasses

import mlflow
import pytest

from helpers import BROKEN, download, metric_steps, search_opts, supertrain_opts
from pipeline.common.latency_table import LatencyTable
from pipeline.search import search
from pipeline.search.space import load_space
from pipeline.supertrain import supertrain
from supervit import SubnetConfig, get_arch, subnet_parts

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The test cluster has one CPU a node: workers and trials leave half of it to the decoding tasks.
SHARE = dict(cpus_per_worker=0.5, decode_cpus=0.5)


def test_image_folder_trains_skipping_bad_images_then_a_bucket_is_searched_timing_subnets_as_deployed(
    ray_session, tmp_path, mlflow_uri, folder_with_bad_images, s3_bucket, capsys
):
    data = str(folder_with_bad_images)
    # 30 training files, 15 a worker: one batch of 15 each, nothing left out.
    opts = supertrain_opts(tmp_path, mlflow_uri, data=data, batch_size=15, max_bad_images=5, name="photos", **SHARE)
    res = supertrain(opts)
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == f"imagefolder:{data}"
    assert run.data.params["train_size"] == "30" and 0 <= res.table["g8_k1"]["test_top1"] <= 100
    assert metric_steps(mlflow_uri, res.run_id, "top1/full") == [0, 1]
    # Both bad files were skipped, counted once each for the run (two workers, two epochs), and named.
    counts = [m.value for m in sorted(client.get_metric_history(res.run_id, "bad_images"), key=lambda m: m.step)]
    assert counts[-1] == 2.0 and counts == sorted(counts)
    shown = capsys.readouterr().out
    assert all(f"warning: skipping undecodable image {data}/train/class_0/{name}" in shown for name in BROKEN)

    # The supernet searched on the photos' Parquet twin in a bucket (--data: same classes, same images), streamed
    # into the trials. (Searching the folder itself differs only in the reader, which test_ray_data covers.)
    # The default latency mode predicts each trial's latency from its compiled parts (compiled once, kept in the
    # table), then compiles and measures whole, as deployed, the answer and the Pareto front before registering;
    # --latency-report-all also times every uniform cell and every trial whole in both modes. A space of two
    # subnets (five parts), one a uniform cell: compiling costs seconds a program.
    space = tmp_path / "small.yaml"
    space.write_text("preset: tiny\ngrids: [4]\nkeep_rates: [[0.5, 1.0], [1.0], [1.0]]\n")
    bucket = s3_bucket("parquet")
    opts = search_opts(tmp_path, mlflow_uri, res.run_id, data=bucket, budgets=["0.3x"], trials=2, decode_cpus=0.5)
    opts = dataclasses.replace(opts, name="b", space=str(space), latency_report=True, latency_report_all=True)
    out = search(dataclasses.replace(opts, latency_mode="predicted"))
    assert len(out.trials) == 2 and 0 <= out.chosen[0]["test_top1"] <= 100
    parent = client.get_run(out.parent_run_id)
    assert parent.data.params["data"].startswith("s3://***@datasets/photos/parquet")  # no credentials in MLflow
    assert parent.data.params["search_size"] == "3"  # 5% of train, one per class

    table = LatencyTable(tmp_path / "lat.parquet")
    rows = table.rows.values()
    parts = {r["subnet"] for r in rows if r.get("kind") == "part"}
    first, second = sorted(out.trials, key=lambda r: r["compile_s"], reverse=True)
    assert first["compile_s"] > 0  # the first trial compiled its parts; compile time is never counted as latency
    for r in out.trials:  # each trial's latency is its parts' calibrated sum, every part in the table
        names = {p.key for p in subnet_parts(get_arch("tiny"), SubnetConfig.parse(r["subnet"]))}
        assert names <= parts and r["latency_parts_ms"] > 0
    # A part serves every subnet and layer: the two trials' seven-odd part uses share programs.
    assert len(parts) < sum(len(subnet_parts(get_arch("tiny"), SubnetConfig.parse(r["subnet"]))) for r in out.trials)
    chosen = out.chosen[0]
    whole = {r["subnet"]: r for r in rows if r.get("kind", "subnet") == "subnet" and r["mode"] == "compiled"}
    # The answer was measured whole, as deployed, and chosen on that measurement; both latencies are kept.
    assert chosen["latency_source"] == "measured" and chosen["latency_ms"] == whole[chosen["subnet"]]["median_ms"]
    assert chosen["latency_predicted_ms"] > 0
    assert all(r["latency_source"] == "measured" for r in out.trials if r["pareto"])  # the front too, whole
    version = client.get_model_version_by_alias("supervit-tiny-subnets", "budget-0_3x")
    assert float(version.tags["latency_measured_ms"]) == pytest.approx(chosen["latency_ms"], rel=1e-3)
    assert float(version.tags["latency_predicted_ms"]) == pytest.approx(chosen["latency_predicted_ms"], rel=1e-3)
    assert version.tags["latency_source"] == "measured" and version.tags["latency_mode"] == "compiled"

    cells = {s.name for s in load_space(space).uniform_subnets()}
    assert cells == {"g4_k1"}
    for mode in ("eager", "compiled"):  # --latency-report-all: every cell and trial in both modes, never mixed
        measured = {r["subnet"] for r in rows if r["mode"] == mode and r.get("kind", "subnet") == "subnet"}
        assert cells | {r["subnet"] for r in out.trials} <= measured, mode
    assert all(r["compile_s"] == 0 for r in rows if r["mode"] == "eager")
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"latency_vs_flops.md", "latency_vs_flops.png", "latency_predicted.md", "latency_predicted.png"} <= artifacts
    metrics = parent.data.metrics
    assert -1 <= metrics["latency_flops_spearman.compiled"] <= 1 and -1 <= metrics["latency_flops_spearman.eager"] <= 1
    assert metrics["latency_prediction.worst_error"] >= metrics["latency_prediction.median_error"] >= 0
    report = open(download(mlflow_uri, out.parent_run_id, "latency_vs_flops.md", tmp_path / "dl")).read()
    assert report.count("Spearman rank correlation") == 2 and "g4_k1" in report
    predicted = open(download(mlflow_uri, out.parent_run_id, "latency_predicted.md", tmp_path / "dl")).read()
    assert "leave one out" in predicted and all(c in predicted for c in cells)
