"""Compiled forms of a subnet (Inductor builds C++ on CPU: seconds each): the compiled program, its per-weights
cache, latency in both modes, and the AOTInductor package."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from helpers import peaked_model
from supervit import ArchConfig, SubnetConfig, measure_latency
from supervit.export import clear_compiled_cache, compile_subnet, compiled_subnet, load_package, package_subnet

# The smallest network with every part (resize, pruning, two grids): compiles in seconds.
MICRO = ArchConfig(
    patch_size=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, grids=(3, 4), prune_blocks=(1,), in_chans=1
)


def test_compiled_program_matches_and_is_cached_per_weights():
    # Each program compiles its own exported code: a recompile limit of 1 must never be reached, however many
    # subnets a process compiles (compiling FixedSubnet.forward itself reached Dynamo's limit of 8).
    with torch._dynamo.config.patch(recompile_limit=1):
        _compiled_program_matches_and_is_cached_per_weights()


def _compiled_program_matches_and_is_cached_per_weights():
    clear_compiled_cache()
    model = peaked_model(MICRO, num_classes=3)
    subnet = SubnetConfig(3, 0.5)
    (compiled, cached), code = run_and_get_code(compiled_subnet, model, subnet, batch_size=2)
    assert not cached and compiled.compile_s > 0 and compiled.mode == "default"
    if torch.backends.mkl.is_available():  # frozen weights: every linear layer runs MKL's prepacked GEMM
        calls = "\n".join(line for line in "\n".join(code).splitlines() if not line.lstrip().startswith(("#", "//")))
        assert calls.count("aoti_torch_cpu__mkl_linear(") == 4 * MICRO.depth + 2  # qkv, proj, fc1, fc2; patch, head
        assert "aoti_torch_cpu_addmm" not in calls
    x = torch.randn(2, 1, MICRO.img_size, MICRO.img_size)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x, subnet), rtol=1e-4, atol=1e-5)
    again, cached = compiled_subnet(model, subnet, batch_size=2)
    assert cached and again is compiled
    with torch.no_grad():  # new weights: the old program must not be served for them
        model.head.bias.add_(1.0)
    fresh, cached = compiled_subnet(model, subnet, batch_size=2)
    assert not cached and fresh is not compiled
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), model(x, subnet), rtol=1e-4, atol=1e-5)


def test_measure_latency_modes_record_mode_and_compile_time():
    clear_compiled_cache()
    model = peaked_model(MICRO, num_classes=3)
    subnet = SubnetConfig(4, 0.5)
    eager = measure_latency(model, subnet, batch_size=1, warmup=1, runs=3, mode="eager")
    assert eager.mode == "eager" and eager.compile_s == 0.0
    first = measure_latency(model, subnet, batch_size=1, warmup=1, runs=3, mode="compiled")
    assert first.mode == "compiled" and first.compile_s > 0
    again = measure_latency(model, subnet, batch_size=1, warmup=1, runs=3, mode="compiled")
    assert again.compile_s == first.compile_s  # the same program: compiled once in this process
    with pytest.raises(ValueError, match="latency mode must be one of eager, compiled"):
        measure_latency(model, subnet, mode="jit")
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_subnet(model, subnet, mode="fastest")


def test_aot_package_takes_any_batch_size(tmp_path):
    model = peaked_model(MICRO, num_classes=3)
    subnet = SubnetConfig(4, 0.5)
    path = package_subnet(model, subnet, tmp_path / "g4_k0.5.pt2")
    run = load_package(path)
    for batch in (1, 3):
        x = torch.randn(batch, 1, MICRO.img_size, MICRO.img_size)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x, subnet), rtol=1e-4, atol=1e-5)
