"""`pipeline.serve` on real Ray Serve: a real search's ladder over HTTP on 127.0.0.1, answering like the library,
following budgets and load, refusing bad input and still serving; the ladder as one MLflow pyfunc model."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers import encode, photo_crop, search_opts
from pipeline.search import search
from pipeline.serve import ServeOptions, start
from pipeline.serve.ingress import haproxy_binary
from pipeline.serve.policy import RequestBudget, Rung, within_budget
from supervit import SubnetConfig, SubnetSampler, SuperViT, get_arch, load_checkpoint, save_checkpoint, supertrain_step
from supervit.data import digits
from supervit.data.transforms import load_image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "t0ken-for-tests"
SLO_MS = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digits_checkpoint(path):
    """`tiny` after three epochs of the sandwich recipe on digits (~10 s): its subnets differ in accuracy (about
    15-30 % top-1), so the search's front has several rungs."""
    torch.manual_seed(0)
    arch = get_arch("tiny")
    data = digits(arch)
    model = SuperViT(arch, num_classes=data.num_classes, pos_embed_init="sincos")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sampler = SubnetSampler(arch, "sandwich", schedules=True)
    for _ in range(3):
        for x, y in torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True):
            supertrain_step(model, x, y, sampler.sample(), opt, clip_grad=1.0)
    return save_checkpoint(path, model, extra={"data": "digits", "preset": "tiny"})


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """A real search of a briefly trained `tiny` supernet (two budgets: small subnets' and the full model's),
    served eager with a bearer token; stopped at the end of the module."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp}/mlflow.db"
    ckpt = _digits_checkpoint(tmp / "tiny.safetensors")
    res = search(search_opts(tmp, uri, ckpt, budgets=["0.3x", "1x"], trials=9, address=ray_session))
    (tmp / "token").write_text(TOKEN + "\n")
    opts = ServeOptions(
        port=_free_port(),
        mlflow_uri=uri,
        mode="eager",
        batch_sizes="1,8",
        latency_runs=5,
        slo_ms=SLO_MS,
        max_request_mb=0.05,
        token_file=str(tmp / "token"),
        address=ray_session,
        latency_table=str(tmp / "lat.parquet"),
    )
    server = start(opts)
    yield server, res, ckpt, uri
    server.stop()


def _request(url: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _image(i: int, fmt: str = "jpeg_rgb") -> bytes:
    return encode(photo_crop(i % 10, np.random.default_rng(i)), fmt)


def _ladder(server) -> list[Rung]:
    status, got = _request(f"{server.url}/subnets")
    assert status == 200
    return [
        Rung(r["subnet"], r["gflops"], r["top1"], {int(b): v for b, v in r["latency_ms"].items()})
        for r in got["subnets"]
    ]


def test_the_ladder_is_the_searchs_front_and_answers(served, tmp_path):
    server, res, _, _ = served
    ladder = _ladder(server)
    names = {r.subnet for r in ladder}
    assert len(ladder) >= 2
    assert {c["subnet"] for c in res.chosen} <= names  # every budget's answer is served
    front = {r["subnet"] for r in res.trials if r["pareto"]}
    assert names - {c["subnet"] for c in res.chosen} <= front
    # The larger budget chose among the smaller budget's trials too: never a less accurate answer.
    small, large = sorted(res.chosen, key=lambda c: c["budget_gflops"])
    assert large["top1"] >= max(r["top1"] for r in res.trials if r["gflops"] <= large["budget_gflops"]) >= small["top1"]
    for r in ladder:
        assert set(r.latency_ms) == {1, 8} and all(v > 0 for v in r.latency_ms.values())
    # The serving run holds the ladder as measured.
    client = mlflow.MlflowClient(server.tracking_uri)
    run = client.get_run(server.run_id)
    assert run.data.tags["search_run_id"] == res.parent_run_id
    assert run.data.tags["supervit.stage"] == "serve"
    # The entry point is the one the cluster was started with (HAProxy where installed), and the run says which.
    assert server.ingress == ("haproxy" if haproxy_binary() else "proxy")
    assert run.data.params["ingress_used"] == server.ingress
    # Each rung names every budget it answers (with two budgets, one subnet may answer both).
    recorded = json.loads(Path(client.download_artifacts(server.run_id, "ladder.json", str(tmp_path))).read_text())
    answers = {r["subnet"]: set(filter(None, r["budget"].split(", "))) for r in recorded["subnets"]}
    for c in res.chosen:
        assert c["budget"] in answers[c["subnet"]]
    assert sum(map(len, answers.values())) == len(res.chosen)


def test_predictions_equal_the_librarys_forward_of_the_rung_a_budget_picks(served):
    server, _, ckpt, _ = served
    model = load_checkpoint(ckpt).eval()
    ladder = _ladder(server)
    for i, rung in enumerate(sorted(ladder, key=lambda r: r.gflops)):
        body = _image(i, ("jpeg_rgb", "png_rgba", "webp", "gif_palette")[i % 4])
        status, got = _request(f"{server.url}/predict?budget={rung.gflops * 1000 * 1.0001:.6f}MFLOPs", body)
        assert status == 200, got
        expected_rung = within_budget(ladder, RequestBudget(gflops=rung.gflops * 1.0001))
        assert got["subnet"] == expected_rung.subnet
        x = load_image(body, model.arch.img_size, model.arch.in_chans, train=False)[None]
        with torch.no_grad():
            probs = model(x, SubnetConfig.parse(got["subnet"])).softmax(dim=1)[0]
        top = probs.topk(5)
        assert got["label"] == int(top.indices[0])
        assert [c for c, _ in got["top5"]] == top.indices.tolist()
        np.testing.assert_allclose([p for _, p in got["top5"]], top.values.numpy(), rtol=1e-4, atol=1e-5)
        assert got["gflops"] == pytest.approx(expected_rung.gflops)
        assert got["latency_ms"] > 0


def test_a_burst_steps_down_the_ladder_and_quiet_brings_back_the_largest(served):
    server, _, ckpt, _ = served
    model = load_checkpoint(ckpt).eval()
    ladder = _ladder(server)
    best = max(ladder, key=lambda r: (r.top1, -r.latency(1), -r.gflops))
    assert best.latency(1) < SLO_MS / 3  # quiet requests have room for it
    body = _image(0)
    quiet = [_request(f"{server.url}/predict", body)[1]["subnet"] for _ in range(5)]
    assert quiet == [best.subnet] * 5
    bodies = [_image(i) for i in range(16)]  # different images: each answer must be its own request's
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        burst = list(pool.map(lambda i: _request(f"{server.url}/predict", bodies[i % 16]), range(192)))
    assert all(status == 200 for status, _ in burst)
    arch = model.arch
    for i, (_, got) in enumerate(burst):
        x = load_image(bodies[i % 16], arch.img_size, arch.in_chans, train=False)[None]
        with torch.no_grad():
            probs = model(x, SubnetConfig.parse(got["subnet"])).softmax(dim=1)[0]
        np.testing.assert_allclose([p for _, p in got["top5"]], probs.topk(5).values.numpy(), rtol=1e-4, atol=1e-5)
        assert got["label"] == int(probs.argmax())
    stepped = [got["subnet"] for _, got in burst if got["subnet"] != best.subnet]
    assert stepped, "under the burst every batch still ran the largest subnet"
    assert max(got["batch"] for _, got in burst) > 1  # requests were batched
    after = [_request(f"{server.url}/predict", body)[1]["subnet"] for _ in range(5)]
    assert after == [best.subnet] * 5


@pytest.mark.parametrize(
    ("query", "body", "status", "message"),
    [
        ("", b"not an image at all", 400, "not an image"),
        ("", b"", 400, "empty"),
        ("", b"\xff" * 60_000, 413, "over the limit"),
        ("?budget=fast", None, 400, "cannot parse budget 'fast'"),
        ("?budget=1MFLOPs", None, 400, "below the smallest subnet served"),
        ("?budget=0.5x&max_latency_ms=3", None, 400, "not both"),
        ("?max_latency_ms=-2", None, 400, "positive number"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_the_server_keeps_serving(served, query, body, status, message):
    server, _, _, _ = served
    got_status, got = _request(f"{server.url}/predict{query}", _image(1) if body is None else body)
    assert got_status == status
    assert set(got) == {"error"} and message in got["error"] and "\n" not in got["error"]
    assert _request(f"{server.url}/predict", _image(2))[0] == 200


def test_a_request_without_the_token_gets_401(served):
    server, _, _, _ = served
    assert _request(f"{server.url}/predict", _image(3), token=None)[0] == 401
    assert _request(f"{server.url}/predict", _image(3), token="wrong")[0] == 401
    assert _request(f"{server.url}/subnets", token=None)[0] == 401
    assert _request(f"{server.url}/predict", _image(3))[0] == 200


def test_the_ladder_is_one_pyfunc_model_that_picks_the_subnet_per_budget(served):
    server, _, ckpt, uri = served
    model = load_checkpoint(ckpt).eval()
    ladder = _ladder(server)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/supervit-tiny-ladder/latest")
    arch = model.arch
    x = torch.stack([load_image(_image(i), arch.img_size, arch.in_chans, train=False) for i in range(3)])
    for rung in ladder:
        out = loaded.predict(x.numpy(), params={"budget": f"{rung.gflops * 1e3 * 1.0001:.6f}MFLOPs"})
        expected = within_budget(ladder, RequestBudget(gflops=rung.gflops * 1.0001))
        assert list(out["subnet"]) == [expected.subnet] * 3
        with torch.no_grad():
            p, label = model(x, SubnetConfig.parse(expected.subnet)).softmax(dim=1).max(dim=1)
        assert list(out["label"]) == label.tolist()
        np.testing.assert_allclose(out["probability"], p.numpy(), rtol=1e-4, atol=1e-6)
    best = max(ladder, key=lambda r: (r.top1, -r.gflops))
    assert set(loaded.predict(x.numpy())["subnet"]) == {best.subnet}


def test_a_killed_replica_comes_back_with_the_weights_and_answers_the_same(served):
    """Serve starts a new replica for one that dies: it takes the weights from the object store (the driver keeps
    them there), builds the ladder again and answers as before. Runs last: the server is down meanwhile."""
    import time

    import ray

    server, _, _, _ = served
    body = _image(5)
    before = _request(f"{server.url}/predict", body)[1]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline, after = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            status, got = _request(f"{server.url}/predict", body)
        except (OSError, ValueError):  # refused, reset or a non-JSON 503 while no replica listens
            status, got = 0, {}
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        if status == 200 and names and names != [replicas[0]["name"]]:
            after = got
            break
        time.sleep(0.5)
    assert after is not None, "no new replica answered within 180 s"
    assert (after["subnet"], after["label"]) == (before["subnet"], before["label"])
    np.testing.assert_allclose([p for _, p in after["top5"]], [p for _, p in before["top5"]], rtol=1e-5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _serve_controllers() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_CONTROLLER" in a["name"]]


def _serving_runs(uri: str, port: int) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("supervit-serve")
    return client.search_runs([experiment.experiment_id], f"params.port = '{port}'") if experiment else []


@pytest.mark.parametrize("when", ["the replica compiles", "the run is logged"])
def test_a_stop_while_it_starts_shuts_serve_down_on_the_cluster(served, ray_session, tmp_path, when):
    """`ray job stop` or a process manager can stop the command before it serves. On a Ray cluster it does not own,
    Serve's controller is detached and would serve on: the stop must shut Serve down and end the run. Runs last, on
    the module's cluster, after its server is stopped (Serve is one per cluster)."""
    server, _, _, uri = served
    server.stop()  # done with it; the fixture's own stop afterwards finds nothing to stop
    port = _free_port()
    # As from a shell on the cluster: its own ports for HAProxy's stats are the cluster's business, not inherited.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_HAPROXY_")}
    cmd = [sys.executable, "-m", "pipeline.serve", "--mlflow-uri", uri, "--address", ray_session, "--port", str(port)]
    # Compiling the rungs makes a long start to stop in; eager rungs get to the MLflow logging at once.
    cmd += ["--mode", "compiled" if when == "the replica compiles" else "eager"]
    cmd += ["--latency-table", str(tmp_path / "lat.parquet")]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (_listening(port) if when == "the replica compiles" else _serving_runs(uri, port)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"not at '{when}' within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if "serving http" in out:  # the stop came after the logging (a fast store): the ordinary stop
        assert proc.returncode == 0 and "stopped" in out, (out, err[-3000:])
    else:
        assert proc.returncode == 130 and "interrupted" in err, (out, err[-3000:])
    deadline = time.monotonic() + 30
    while (_serve_controllers() or _listening(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _serve_controllers(), "Serve still runs on the cluster"
    assert not _listening(port)
    runs = _serving_runs(uri, port)
    assert all(r.info.status != "RUNNING" for r in runs)
    if when == "the run is logged" and "serving http" not in out:
        assert [r.info.status for r in runs] == ["KILLED"]
