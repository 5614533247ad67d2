"""Run-state files beside Ray's storage, local or in a bucket (the bucket path is exercised via file://)."""

import json
import os
import time

import pytest

from pipeline.common.cli import UsageError
from pipeline.common.runs import find_resume, read_run_file, write_run_file


@pytest.fixture(params=["local", "uri"])
def storage(request, tmp_path):
    return str(tmp_path) if request.param == "local" else f"file://{tmp_path}"


def test_write_then_read_whole_files(storage, tmp_path):
    assert read_run_file(storage, "a", "state.json") is None
    write_run_file(storage, "a", "state.json", '{"x": 1}')
    write_run_file(storage, "a", "state.json", '{"x": 2}')  # replaced, not appended
    assert json.loads(read_run_file(storage, "a", "state.json")) == {"x": 2}
    assert sorted(os.listdir(tmp_path / "a")) == ["state.json"]  # no temporary file left behind


def test_find_resume_by_name_and_newest_unfinished(tmp_path):
    storage = str(tmp_path)
    for name, status in (("old", "running"), ("done", "finished"), ("new", "running")):
        write_run_file(storage, name, "s.json", json.dumps({"status": status}))
        time.sleep(0.02)  # distinct modification times
    assert find_resume(storage, None, "s.json", "run")[0] == "new"
    assert find_resume(storage, "old", "s.json", "run") == ("old", {"status": "running"})
    with pytest.raises(UsageError, match="run 'done' .* already finished"):
        find_resume(storage, "done", "s.json", "run")
    with pytest.raises(UsageError, match="nothing to resume: no search 'x'"):
        find_resume(storage, "x", "s.json", "search")
    with pytest.raises(UsageError, match="no unfinished search"):
        find_resume(str(tmp_path / "empty"), None, "s.json", "search")


def test_find_resume_in_a_bucket_needs_the_name(tmp_path):
    storage = f"file://{tmp_path}"
    write_run_file(storage, "r1", "s.json", json.dumps({"status": "running"}))
    assert find_resume(storage, "r1", "s.json", "run")[0] == "r1"
    with pytest.raises(UsageError, match="needs the run name"):
        find_resume(storage, None, "s.json", "run")
    with pytest.raises(UsageError, match="no run 'r2'"):
        find_resume(storage, "r2", "s.json", "run")


def test_stable_names_are_meaningful_and_never_reused(tmp_path):
    from pipeline.common.runs import stable_name

    storage = str(tmp_path)
    assert stable_name(storage, "supertrain", "tiny", "/data/imagenet/") == "supertrain-tiny-imagenet-1"
    (tmp_path / "supertrain-tiny-imagenet-1").mkdir()
    assert stable_name(storage, "supertrain", "tiny", "/data/imagenet") == "supertrain-tiny-imagenet-2"
    assert stable_name(f"file://{tmp_path}", "supertrain", "tiny", "imagenet") == "supertrain-tiny-imagenet-2"
    assert stable_name(storage, "search", "0.5x", "2.3GFLOPs") == "search-0.5x-2.3GFLOPs-1"
    assert stable_name(str(tmp_path / "new"), "search", "s3://bucket/shards/*.parquet") == "search-shards-1"
