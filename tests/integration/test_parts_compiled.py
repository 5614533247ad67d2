"""Latency from compiled parts on a small architecture (real Inductor compiles, seconds each): the calibrated sum
of the parts predicts a whole compiled program it was not fitted on. One thread and batch 8, so the other test
process on a two-core machine disturbs the timings less and the parts compute more than a call costs."""

import statistics

import pytest
import torch

from supervit import ArchConfig, SubnetConfig, SuperViT, fit_calibration, predict_latency, time_program
from supervit.export import compile_module, compile_subnet
from supervit.parts import PartModule, space_parts

# Small enough to compile in seconds, large enough that a block computes more than a call costs.
ARCH = ArchConfig(
    patch_size=4, embed_dim=192, depth=2, num_heads=3, mlp_ratio=4.0, grids=(4, 6), prune_blocks=(1,), in_chans=1
)
FULL, PRUNED = SubnetConfig(6, 1.0), SubnetConfig(6, 0.5)


def test_the_calibrated_sum_of_parts_predicts_a_whole_program_it_was_not_fitted_on():
    torch.manual_seed(0)
    model = SuperViT(ARCH, num_classes=5).eval()
    parts = space_parts(ARCH, [FULL, PRUNED])
    assert {p.kind for p in parts} == {"embed", "block", "prune", "head"} and len(parts) == 4
    programs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # Inductor builds its kernels for the thread count set at compile time
    with torch.inference_mode():
        for p in parts:
            module = PartModule(model, p)
            x = module.example_input(8)
            programs[p] = (compile_module(module, x)[0], x)
        for s in (FULL, PRUNED):
            c = compile_subnet(model, s, batch_size=8)
            programs[s] = (c, c.module.example_input(8))
    # Rounds over every program, as the benchmark does: load from the other test process hits them alike.
    try:
        rounds = {k: [] for k in programs}
        for _ in range(5):
            for k, (fn, x) in programs.items():
                rounds[k].append(time_program(fn, x, 3, 20).median_ms)
    finally:
        torch.set_num_threads(threads)
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    # The offset fitted on the full subnet's program predicts the pruned one's, which it has not seen.
    cal = fit_calibration([(predict_latency(ARCH, FULL, ms), ms[FULL])])
    predicted = predict_latency(ARCH, PRUNED, ms, cal)
    assert predicted == pytest.approx(ms[PRUNED], rel=0.25), (predicted, ms)
