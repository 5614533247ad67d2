"""The shared latency table: concurrent writers lose nothing, crashes leave it readable, modes never mix."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.common.cli import UsageError
from pipeline.common.latency_table import KEY, LatencyTable

ROOT = Path(__file__).resolve().parents[2]


def _row(subnet="g4_k1", mode="eager", ms=1.0, **kw) -> dict:
    base = {"fingerprint": "f", "arch": "a", "subnet": subnet, "batch_size": 1, "dtype": "float32", "mode": mode}
    return base | {"median_ms": ms} | kw


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def _python(script: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, stderr=subprocess.PIPE)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path, go = tmp_path / "lat", tmp_path / "go"
    writer = """
        import os, time, sys
        from pipeline.common.latency_table import LatencyTable
        t = LatencyTable({path!r})
        open({ready!r}, "w").close()
        while not os.path.exists({go!r}):  # both have read the (empty) table: neither knows the other's rows
            time.sleep(0.001)
        for i in range(40):
            t.put({{"fingerprint": "f", "arch": "a", "subnet": "{who}%d" % i, "batch_size": 1, "dtype": "float32",
                   "mode": "eager", "median_ms": float(i)}})
    """
    ready = [tmp_path / f"ready-{who}" for who in "ab"]
    procs = [
        _python(writer.format(go=str(go), path=str(path), who=who, ready=str(r)))
        for who, r in zip("ab", ready, strict=True)
    ]
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()  # both start together
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read().decode()[-2000:]
    table = LatencyTable(path)
    assert {r["subnet"] for r in table.rows.values()} == {f"{w}{i}" for w in "ab" for i in range(40)}


def test_a_lookup_sees_rows_another_table_wrote_since(tmp_path):
    mine, theirs = LatencyTable(tmp_path / "lat"), LatencyTable(tmp_path / "lat")
    row = _row("g8_k0.5", ms=3.0)
    assert mine.get(_key(row)) is None
    theirs.put(row)
    assert mine.get(_key(row))["median_ms"] == 3.0


def test_the_mode_separates_rows_and_the_newest_row_wins(tmp_path):
    table = LatencyTable(tmp_path / "lat")
    table.put(_row(mode="eager", ms=2.0))
    table.put(_row(mode="compiled", ms=1.0))
    table.put(_row(mode="compiled", ms=0.9))  # measured again: replaces the older compiled row
    again = LatencyTable(tmp_path / "lat")
    assert len(again) == 2
    assert again.get(_key(_row(mode="eager")))["median_ms"] == 2.0
    assert again.get(_key(_row(mode="compiled")))["median_ms"] == 0.9
    with pytest.raises(ValueError, match="lacks key fields \\['mode'\\]"):
        table.put({k: v for k, v in _row().items() if k != "mode"})
    with pytest.raises(ValueError, match="key has 6 fields"):
        table.get(("f", "a", "g4_k1", 1, "float32"))


@pytest.mark.parametrize("where", ["before_rename", "mid_write"])
def test_crash_while_writing_leaves_a_readable_table(tmp_path, where):
    path = tmp_path / "lat"
    table = LatencyTable(path)
    table.put(_row("g4_k1", ms=1.0))
    before = dict(table.rows)
    proc = _python(f"""
        import os, pyarrow.parquet as pq
        from pipeline.common.latency_table import LatencyTable
        if {where!r} == "before_rename":
            os.replace = lambda *a: os.kill(os.getpid(), 9)
        else:
            real = pq.write_table
            def half(table, where, **kw):
                real(table, where, **kw)
                os.truncate(where, os.path.getsize(where) // 2)
                os.kill(os.getpid(), 9)
            pq.write_table = half
        LatencyTable({str(path)!r}).put({_row("g8_k1", ms=2.0)!r})
    """)
    assert proc.wait(60) == -signal.SIGKILL
    assert any(n.endswith(".tmp") for n in os.listdir(path))  # the half-written file is there ...
    after = LatencyTable(path)
    assert after.rows == before  # ... and the table reads as before it
    after.put(_row("g6_k1", ms=3.0))  # and takes new rows
    assert len(LatencyTable(path)) == 2


def _legacy(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_an_old_single_file_table_reads_and_converts_on_the_first_put(tmp_path):
    path = tmp_path / "latency_table.parquet"
    old = [{k: v for k, v in _row(s, ms=i).items() if k != "mode"} for i, s in enumerate(["g4_k1", "g6_k1"])]
    _legacy(path, old)
    table = LatencyTable(path)
    assert len(table) == 2 and table.get(_key(_row("g6_k1")))["median_ms"] == 1  # rows without a mode: eager
    table.put(_row("g6_k1", mode="compiled", ms=0.5))
    assert path.is_dir() and (tmp_path / "latency_table.parquet.v1").is_file()
    again = LatencyTable(path)
    assert len(again) == 3 and again.get(_key(_row("g4_k1")))["median_ms"] == 0


def test_crash_while_converting_an_old_table_leaves_it_readable(tmp_path):
    path = tmp_path / "latency_table.parquet"
    _legacy(path, [_row("g4_k1", ms=1.0)])
    proc = _python(f"""
        import os
        from pipeline.common.latency_table import LatencyTable
        real = os.rename
        def die(*a):
            os.kill(os.getpid(), 9)
        os.rename = die  # after the old file became the backup, before the new directory took its place
        LatencyTable({str(path)!r}).put({_row("g8_k1", ms=2.0)!r})
    """)
    assert proc.wait(60) == -signal.SIGKILL
    assert not path.exists()
    table = LatencyTable(path)  # reads the backup
    assert [r["subnet"] for r in table.rows.values()] == ["g4_k1"]
    table.put(_row("g8_k1", ms=2.0))  # and finishes the conversion
    assert path.is_dir() and len(LatencyTable(path)) == 2


def test_compaction_keeps_every_row_and_readers_keep_up(tmp_path):
    path = tmp_path / "lat"
    writer, reader = LatencyTable(path), LatencyTable(path)
    for i in range(5):
        writer.put(_row(f"g4_k{i}", ms=float(i)))
    writer.put(_row("g4_k0", ms=9.0))  # newer row of an existing key
    assert writer.compact() == 6
    assert len([n for n in os.listdir(path) if n.endswith(".parquet")]) == 1
    assert reader.get(_key(_row("g4_k4")))["median_ms"] == 4.0  # its listing was stale; it lists again
    fresh = LatencyTable(path)
    assert len(fresh) == 5 and fresh.get(_key(_row("g4_k0")))["median_ms"] == 9.0


def test_file_uri_and_a_damaged_part(tmp_path):
    table = LatencyTable(f"file://{tmp_path}/lat")
    table.put(_row())
    assert len(LatencyTable(tmp_path / "lat")) == 1
    (tmp_path / "lat" / "part-zzz-broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(UsageError, match="part-zzz-broken.parquet is not readable Parquet"):
        LatencyTable(tmp_path / "lat")
    snap = table.write_snapshot(tmp_path / "snapshot.parquet")
    assert pq.read_table(snap).num_rows == 1
