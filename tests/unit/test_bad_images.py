"""Undecodable images without Ray: the decode step's error rows, a consumer's `BadImages`, the run's ledger."""

import numpy as np
import pytest

from pipeline.common.batches import BadImages, ledger_over, raise_if_over, run_bad_images
from pipeline.common.data import _decode_rows, _Transform
from pipeline.common.ledger import BadImageLedger
from supervit.data import Augment, DataError

EVAL = _Transform(img_size=16, in_chans=1, train=False, augment=Augment())


def _rows(payloads: list[bytes], names: list[str]) -> dict:
    return _decode_rows(list(range(len(names))), payloads.__getitem__, names, [0] * len(names), EVAL)


def test_a_bad_file_reads_the_same_every_time():
    """The reason names no object address (PIL's message does), so a file met twice reads the same."""
    junk = b"this is no image"
    first, again = _rows([junk], ["a.png"]), _rows([junk], ["a.png"])
    assert first["label"].tolist() == [-1] and first["error"][0].startswith("a.png: cannot identify image file")
    assert first["error"][0] == again["error"][0] and " object at 0x" not in first["error"][0]


def test_bad_images_count_each_file_once_and_report_it_once():
    warned, new = [], []
    bad = BadImages(cap=5, warn=warned.append, on_new=lambda source, error: new.append(source))
    batch = {
        "image": np.zeros((3, 1, 4, 4), np.float32),
        "label": np.array([1, -1, -1]),
        "source": np.array(["ok.jpg", "a.png", "b.jpg"], dtype=object),
        "error": np.array(["", "a.png: x", "b.jpg: y"], dtype=object),
    }
    for _ in range(2):  # the same files again (next epoch)
        out = bad(batch)
        assert out["label"].tolist() == [1] and tuple(out["image"].shape) == (1, 1, 4, 4)
    assert bad.count == 2 and bad.rows == 4 and new == ["a.png", "b.jpg"] and len(warned) == 2
    with pytest.raises(DataError, match="3 undecodable images, more than --max-bad-images 2"):
        BadImages(cap=2, warn=lambda _: None)(
            {**batch, "source": np.array(["c", "d", "e"], dtype=object), "error": np.array(["c: 1", "d: 2", "e: 3"])}
        )


def test_the_ledger_counts_files_not_messages():
    ledger = BadImageLedger(cap=1)
    assert ledger.add("a.png", "a.png: reason one") == 1
    assert ledger.add("a.png", "a.png: reason worded otherwise") == 1  # another worker met the same file
    assert not ledger.over()
    assert ledger.add("b.jpg", "b.jpg: truncated") == 2 and ledger.over()
    assert ledger.report() == ["a.png: reason one", "b.jpg: truncated"]


def test_a_run_without_a_ledger_has_nothing_to_count():
    """In-memory data has no ledger: never over its cap, and its consumers drop nothing."""
    assert ledger_over(None) is False and run_bad_images(None, cap=0) is None
    raise_if_over(None, cap=0)  # does not raise
