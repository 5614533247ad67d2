"""The latency table: a crash while it is written leaves the previous table intact and readable."""

import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.latency_table import LatencyTable


@pytest.mark.parametrize("where", ["before_rename", "mid_write"])
def test_crash_while_writing_the_latency_table_keeps_the_previous_one(tmp_path, where):
    path = tmp_path / "lat.parquet"
    table = LatencyTable(path)
    row = {"fingerprint": "f", "arch": "a", "subnet": "g4_k1", "batch_size": 1, "dtype": "float32", "median_ms": 1.0}
    table.put(row)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, pyarrow.parquet as pq
        from pipeline.latency_table import LatencyTable
        if {where!r} == "before_rename":
            os.replace = lambda *a: os.kill(os.getpid(), 9)
        else:
            real = pq.write_table
            def half(table, where, **kw):
                real(table, where, **kw)
                size = os.path.getsize(where)
                os.truncate(where, size // 2)
                os.kill(os.getpid(), 9)
            pq.write_table = half
        t = LatencyTable({str(path)!r})
        t.put({{**{row!r}, "subnet": "g8_k1", "median_ms": 2.0}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert LatencyTable(path).rows == table.rows  # the previous table, intact and readable
