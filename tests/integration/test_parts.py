"""Latency from compiled parts on a small architecture (real Inductor compiles, seconds each): the calibrated sum
of the parts predicts a whole compiled program it was not fitted on. One thread and batch 8, so the other test
process on a two-core machine disturbs the timings less and the parts compute more than a call costs."""

import pytest
import torch

from supervit import ArchConfig, SubnetConfig, SuperViT, fit_calibration, measure_latency, predict_latency
from supervit.export import clear_compiled_cache
from supervit.parts import measure_part, space_parts

# Small enough to compile in seconds, large enough that a block computes more than a call costs.
ARCH = ArchConfig(
    patch_size=4, embed_dim=192, depth=2, num_heads=3, mlp_ratio=4.0, grids=(4, 6), prune_blocks=(1,), in_chans=1
)
FULL, PRUNED = SubnetConfig(6, 1.0), SubnetConfig(6, 0.5)


def test_the_calibrated_sum_of_parts_predicts_a_whole_program_it_was_not_fitted_on():
    torch.manual_seed(0)
    model = SuperViT(ARCH, num_classes=5).eval()
    clear_compiled_cache()
    parts = space_parts(ARCH, [FULL, PRUNED])
    assert {p.kind for p in parts} == {"embed", "block", "prune", "head"} and len(parts) == 4
    ms = {p: measure_part(model, p, batch_size=8, warmup=5, runs=50, threads=1).median_ms for p in parts}
    whole = {
        s: measure_latency(model, s, 8, warmup=5, runs=50, threads=1, mode="compiled").median_ms for s in (FULL, PRUNED)
    }
    clear_compiled_cache()
    # The offset fitted on the full subnet's program predicts the pruned one's, which it has not seen.
    cal = fit_calibration([(predict_latency(ARCH, FULL, ms), whole[FULL])])
    predicted = predict_latency(ARCH, PRUNED, ms, cal)
    assert predicted == pytest.approx(whole[PRUNED], rel=0.15), (predicted, whole, ms)
