"""Bad input to either command: one line on stderr, exit status 2, nothing written, and no Ray started."""

import os
import socket

import mlflow
import pytest

from helpers import one_line_error, tiny_checkpoint
from pipeline import search, supertrain
from supervit import ArchConfig, SuperViT, save_checkpoint


@pytest.fixture(autouse=True)
def no_ray():
    import ray

    before = ray.is_initialized()  # a whole-suite run shares the Ray that tests/e2e started
    yield
    assert before or not ray.is_initialized()  # every check happens before Ray starts


def test_supertrain_bad_inputs(tmp_path, mlflow_uri, capsys):
    main = supertrain.main
    base = ["--storage", str(tmp_path / "ray"), "--mlflow-uri", mlflow_uri, "--epochs", "1"]
    assert "unknown preset 'huge'" in one_line_error(main, base + ["--preset", "huge"], capsys)
    assert str(tmp_path / "absent") in one_line_error(main, base + ["--data", str(tmp_path / "absent")], capsys)
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in one_line_error(main, base + ["--data", str(tmp_path / "empty")], capsys)
    other = ArchConfig(patch_size=2, embed_dim=32, depth=2, num_heads=2, grids=(4, 8), prune_blocks=(1,), in_chans=1)
    save_checkpoint(tmp_path / "other.safetensors", SuperViT(other, num_classes=10))
    err = one_line_error(main, base + ["--init-from", str(tmp_path / "other.safetensors")], capsys)
    assert "expected tiny" in err
    assert "nothing to resume" in one_line_error(main, base + ["--resume"], capsys)
    assert "MLflow server at http://127.0.0.1:9 is unreachable" in one_line_error(
        main, ["--mlflow-uri", "http://127.0.0.1:9", "--storage", str(tmp_path / "ray")], capsys
    )
    assert "cannot connect to Ray at 127.0.0.1:9" in one_line_error(main, base + ["--address", "127.0.0.1:9"], capsys)
    (tmp_path / "bad.yaml").write_text("epochs: 1\ncolour: red\n")
    assert "unknown options colour" in one_line_error(main, base + ["--config", str(tmp_path / "bad.yaml")], capsys)
    (tmp_path / "typed.yaml").write_text("epochs: many\n")
    assert "option epochs must be int" in one_line_error(
        main, base + ["--config", str(tmp_path / "typed.yaml")], capsys
    )
    assert "--epochs must be at least 1, got 0" in one_line_error(main, base + ["--epochs", "0"], capsys)
    assert "--lr must be positive" in one_line_error(main, base + ["--lr", "0"], capsys)
    assert "invalid choice: 'best'" in one_line_error(main, base + ["--recipe", "best"], capsys)
    assert "fewer than one global batch" in one_line_error(
        main, base + ["--data", "synthetic", "--batch-size", "200", "--workers", "2"], capsys
    )
    assert not os.path.exists(tmp_path / "ray") and not os.path.exists(tmp_path / "mlflow.db")  # nothing written


def test_search_bad_inputs(tmp_path, mlflow_uri, capsys):
    main = search.main
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors", trained=False)
    base = ["--checkpoint", str(ckpt), "--storage", str(tmp_path / "ray"), "--mlflow-uri", mlflow_uri]
    base += ["--latency-table", str(tmp_path / "lat.parquet")]
    for budget in ("2.3GFLOP", "-1GFLOPs", "abc", "0x"):
        assert "accepted forms: 2.3GFLOPs" in one_line_error(main, base + [f"--budget={budget}"], capsys)
    assert "unrecognized arguments: --budgte" in one_line_error(main, base + ["--budgte", "0.5x"], capsys)
    err = one_line_error(main, base + ["--budget", "1MFLOPs"], capsys)
    assert "below the smallest subnet of the space (0.002065 GFLOPs" in err
    err = one_line_error(main, base + ["--budget", "0.5x", "--space", str(tmp_path / "nope.yaml")], capsys)
    assert "does not exist" in err
    (tmp_path / "broken.yaml").write_text("preset: tiny\ngrids: [4, 6\n")
    err = one_line_error(main, base + ["--budget", "0.5x", "--space", str(tmp_path / "broken.yaml")], capsys)
    assert "not valid YAML" in err
    deit = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces", "deit_s.yaml")
    assert "are not grids of preset tiny" in one_line_error(main, base + ["--budget", "0.5x", "--space", deit], capsys)
    assert "does not exist: run `python -m pipeline.supertrain` first" in one_line_error(
        main, ["--budget", "0.5x", "--mlflow-uri", mlflow_uri, "--storage", str(tmp_path / "ray")], capsys
    )
    assert "MLflow server at http://127.0.0.1:9 is unreachable" in one_line_error(
        main, ["--budget", "0.5x", "--mlflow-uri", "http://127.0.0.1:9"], capsys
    )
    assert "give at least one --budget" in one_line_error(main, base, capsys)
    err = one_line_error(main, base + ["--budget", "0.5x", "--latency-budget", "fast"], capsys)
    assert "cannot parse latency budget" in err
    assert "--trials must be at least 1" in one_line_error(main, base + ["--budget", "0.5x", "--trials", "0"], capsys)
    assert "nothing to resume" in one_line_error(main, base + ["--resume"], capsys)
    # nothing was written: no Ray storage, no latency table, no MLflow store
    assert not any(p.exists() for p in (tmp_path / "ray", tmp_path / "lat.parquet", tmp_path / "mlflow.db"))


def test_search_store_without_a_supertraining_run(tmp_path, mlflow_uri, capsys):
    mlflow.MlflowClient(mlflow_uri).create_experiment("something-else")
    capsys.readouterr()  # MLflow's own log lines from creating the store
    assert "no finished supertraining run in the MLflow store" in one_line_error(
        search.main, ["--budget", "0.5x", "--mlflow-uri", mlflow_uri, "--storage", str(tmp_path / "ray")], capsys
    )


def test_serve_bad_inputs(tmp_path, mlflow_uri, capsys, monkeypatch):
    from pipeline.common.runs import STAGE_TAG
    from pipeline.serve import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = str(s.getsockname()[1])
    base = ["--mlflow-uri", mlflow_uri, "--port", free]
    assert "does not exist: run `python -m pipeline.supertrain` and `python -m pipeline.search` first" in (
        one_line_error(main, base, capsys)
    )
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("supervit-search")
    capsys.readouterr()
    assert "no finished search run in the MLflow store" in one_line_error(main, base, capsys)
    # A finished search that logged no front (stopped before its answers, or of another version).
    run = client.create_run(exp, tags={STAGE_TAG: "search"}).info.run_id
    client.set_terminated(run, "FINISHED")
    assert f"search run {run} has no Pareto front" in one_line_error(main, base, capsys)
    assert f"no MLflow run 'f{'0' * 31}'" in one_line_error(main, [*base, "--search", "f" + "0" * 31], capsys)
    other = client.create_run(exp, tags={STAGE_TAG: "supertrain"}).info.run_id
    assert "is not a search" in one_line_error(main, [*base, "--search", other], capsys)
    assert "--batch-sizes" in one_line_error(main, [*base, "--batch-sizes", "0"], capsys)
    assert "--token-file" in one_line_error(main, [*base, "--token-file", str(tmp_path / "none")], capsys)
    assert "invalid choice: 'fast'" in one_line_error(main, [*base, "--mode", "fast"], capsys)
    with socket.socket() as s:  # a port in use
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = str(s.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{taken}" in one_line_error(
            main, ["--mlflow-uri", mlflow_uri, "--port", taken], capsys
        )
    (tmp_path / "a_file").write_text("")
    err = one_line_error(main, [*base, "--mode", "packaged", "--packages", str(tmp_path / "a_file" / "pk")], capsys)
    assert "--packages" in err and not (tmp_path / "a_file" / "pk").exists()
    import ray

    # As from a fresh shell: the entry point is checked for a local Ray about to start (this process may share
    # the e2e tests' Ray under pytest-xdist).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no haproxy on it, and the override names none there
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    assert "--ingress haproxy: no haproxy binary here" in one_line_error(main, [*base, "--ingress", "haproxy"], capsys)
