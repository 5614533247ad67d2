"""Latency from parts, without compiling: which parts make a subnet, that the parts are the program, the
calibration fit, and what a prediction refuses."""

import pytest
import torch

from pipeline.search.latency_report import prediction_report
from supervit import ArchConfig, Calibration, Part, SubnetConfig, SuperViT, fit_calibration, get_arch, predict_latency
from supervit.export import FixedSubnet
from supervit.parts import PartModule, space_parts, subnet_parts

TINY = get_arch("tiny")
MICRO = ArchConfig(
    patch_size=2, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, grids=(3, 4), prune_blocks=(1, 2), in_chans=1
)


def test_a_subnet_is_its_embedding_its_blocks_and_the_head():
    parts = subnet_parts(TINY, SubnetConfig(8, (0.5, 1.0, 0.7)))
    # grid 8: 65 tokens; block 1 keeps 1 + ceil(0.5 * 65) = 34; block 3 keeps all; block 5 keeps 1 + ceil(0.7 * 34).
    assert [p.name for p in parts] == [
        "embed@g8",
        "block@65",
        "prune@65>34",
        "block@34",
        "block@34",
        "block@34",
        "prune@34>25",
        "head",
    ]
    assert subnet_parts(TINY, None) == subnet_parts(TINY, TINY.largest)
    for p in parts:
        assert Part.parse(p.name) == p and Part.parse(p.key) == p and p.key.startswith("part:")
    with pytest.raises(ValueError, match="not a part name"):
        Part.parse("g8_k1")


def test_parts_are_shared_across_subnets_and_layers():
    space = [SubnetConfig(g, (r1, r2, r3)) for g in TINY.grids for r1 in (0.5, 1) for r2 in (0.5, 1) for r3 in (0.5, 1)]
    parts = space_parts(TINY, space)
    assert len(parts) < sum(len(set(subnet_parts(TINY, s))) for s in space)
    assert [p for p in parts if p.kind == "head"] == [Part("head")]  # one head for every subnet
    assert {p.tokens for p in parts if p.kind == "embed"} == set(TINY.grids)


@pytest.mark.parametrize("subnet", [SubnetConfig(4, (1.0, 1.0)), SubnetConfig(4, (0.5, 0.7)), SubnetConfig(3, 0.5)])
def test_the_parts_run_in_order_are_the_subnets_program(subnet):
    torch.manual_seed(0)
    model = SuperViT(MICRO, num_classes=5).eval()
    with torch.no_grad():  # distinct blocks, so a part built from the wrong block would not match
        for i, b in enumerate(model.blocks):
            b.mlp.fc2.bias.add_(0.1 * (i + 1))
    x = torch.randn(2, 1, MICRO.img_size, MICRO.img_size)
    with torch.inference_mode():
        # Part modules of the subnet's own blocks: the chain equals FixedSubnet (and so the supernet's forward).
        fixed = FixedSubnet(model, subnet)
        y = x
        parts = subnet_parts(MICRO, subnet)
        for i, p in enumerate(parts):
            m = PartModule(model, p)
            if p.kind in ("block", "prune"):  # a part is timed with the first block's weights; here, its own
                m.inner.load_state_dict(fixed.blocks[i - 1].state_dict())
            y = m(y[:, 0] if p.kind == "head" else y)
        torch.testing.assert_close(y, fixed(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, model(x, subnet), rtol=1e-4, atol=1e-5)


def test_calibration_fits_a_line_an_offset_or_nothing():
    cal = fit_calibration([(2.0, 1.0), (4.0, 2.0), (6.0, 3.0)])
    assert cal.scale == pytest.approx(0.5) and cal.offset_ms == pytest.approx(0.0) and cal.points == 3
    assert cal(10.0) == pytest.approx(5.0)
    one = fit_calibration([(2.0, 1.5)])
    assert (one.scale, one.offset_ms) == (1.0, pytest.approx(-0.5))
    close = fit_calibration([(2.0, 1.5), (2.05, 1.0)])  # no spread: the slope would be noise
    assert close.scale == 1.0 and close.offset_ms == pytest.approx(-0.775)
    assert fit_calibration([]) == Calibration()


def test_a_prediction_is_the_calibrated_sum_and_never_sums_short():
    subnet = SubnetConfig(4, (0.5, 1.0, 1.0))
    parts = subnet_parts(TINY, subnet)
    ms = {p: 0.1 * (i + 1) for i, p in enumerate(dict.fromkeys(parts))}
    total = sum(ms[p] for p in parts)  # a part used twice counts twice
    assert predict_latency(TINY, subnet, ms) == pytest.approx(total)
    assert predict_latency(TINY, subnet, ms, Calibration(0.5, 0.2, 2)) == pytest.approx(0.5 * total + 0.2)
    partial = dict(ms)
    del partial[parts[2]]
    with pytest.raises(KeyError, match=parts[2].name):
        predict_latency(TINY, subnet, partial)


def test_the_prediction_report_scores_predicted_against_measured():
    rows = [
        {"subnet": f"s{i}", "predicted_ms": p, "measured_ms": m, "mode": "compiled", "hardware": "cpu:x"}
        for i, (p, m) in enumerate([(1.0, 1.0), (2.1, 2.0), (2.8, 3.0), (5.0, 4.0)])
    ]
    rep = prediction_report(rows)
    key = ("cpu:x", "compiled")
    assert rep.spearman[key] == pytest.approx(1.0)
    assert rep.worst_error[key] == pytest.approx(0.25) and rep.within_10pct[key] == 0.75
    assert rep.median_error[key] == pytest.approx((0.05 + 0.2 / 3) / 2)
    assert "| s3 | 4 | 5 | +25.0 % |" in rep.markdown
    with pytest.raises(ValueError, match="no rows"):
        prediction_report([])
