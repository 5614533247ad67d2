"""Deployable forms of a subnet: the fixed module, the exported program (any batch), the compiled program."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from supervit import ArchConfig, FixedSubnet, SubnetConfig, SuperViT, export_subnet, measure_latency
from supervit.export import (
    KeepTokensBlock,
    clear_compiled_cache,
    compile_subnet,
    compiled_subnet,
    load_package,
    package_subnet,
)

SMALL = ArchConfig(
    patch_size=4,
    embed_dim=48,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    grids=(4, 6, 8),
    prune_blocks=(1, 3, 5),
    in_chans=3,
    name="small",
)
# The smallest network with every part (resize, pruning, two grids): compiles in seconds.
MICRO = ArchConfig(
    patch_size=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, grids=(3, 4), prune_blocks=(1,), in_chans=1
)

SUBNETS = [
    SubnetConfig(8, 1.0),
    SubnetConfig(8, 0.5),
    SubnetConfig(6, 0.7),
    SubnetConfig(4, 0.5),
    SubnetConfig(8, (0.9, 0.7, 0.5)),
    SubnetConfig(6, (1.0, 0.5, 0.7)),
    SubnetConfig(4, (0.5, 1.0, 0.3)),
]


def _model(arch: ArchConfig, dtype=torch.float32, num_classes: int = 7) -> SuperViT:
    torch.manual_seed(1)
    model = SuperViT(arch, num_classes=num_classes).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init: peaked attention, distinct rankings
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("subnet", SUBNETS, ids=str)
def test_fixed_subnet_equals_the_supernet_forward(subnet, dtype):
    model = _model(SMALL, dtype)
    fixed = FixedSubnet(model, subnet)
    x = torch.randn(3, 3, SMALL.img_size, SMALL.img_size, dtype=dtype)
    with torch.no_grad():
        expected = model(x, subnet)
        assert torch.equal(fixed(x), expected)  # the same operations, in the same order
    assert expected.std() > 0.1


def test_fixed_subnet_holds_only_its_subnet_and_fixed_token_counts():
    model = _model(SMALL)
    subnet = SubnetConfig(6, (0.9, 1.0, 0.5))
    fixed = FixedSubnet(model, subnet)
    state = fixed.state_dict()
    pos = [k for k in state if "pos_embed" in k]
    assert pos == ["pos_embed"] and torch.equal(state["pos_embed"], model.pos_embed_list[1].detach())
    keep = [b.num_keep for b in fixed.blocks if isinstance(b, KeepTokensBlock)]
    assert keep == [fixed.tokens[1] - 1, fixed.tokens[5] - 1]  # the 1.0 stage runs the plain block
    assert fixed.tokens[1] == 1 + 34 and fixed.tokens[-1] == 1 + 18  # ceil(0.9 * 37), ceil(0.5 * 35)
    with torch.no_grad():  # its own copy of the weights: changing it leaves the supernet alone
        fixed.blocks[0].attn.qkv.weight.zero_()
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0


def test_input_at_grid_size_is_not_resized():
    model = _model(SMALL)
    subnet = SubnetConfig(4, 0.5)
    fixed = FixedSubnet(model, subnet, input_size=16)
    assert isinstance(fixed.resize, torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x, subnet))


def _count(program: torch.export.ExportedProgram, op) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target == op)


@pytest.mark.parametrize("subnet", [SubnetConfig(8, (0.9, 0.7, 0.5)), SubnetConfig(6, 1.0)], ids=str)
def test_exported_program_takes_any_batch_size(subnet):
    model = _model(SMALL)
    program = export_subnet(model, subnet)
    # One static graph: a top-k per pruning stage that drops tokens, and nothing that depends on the subnet.
    assert _count(program, torch.ops.aten.topk.default) == (3 if subnet.keep_rates != (1.0,) else 0)
    run = program.module()
    for batch in (1, 2, 64):
        x = torch.randn(batch, 3, SMALL.img_size, SMALL.img_size)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x, subnet), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        export_subnet(model, subnet, example_batch=1)


def test_a_wrong_fixed_subnet_is_refused():
    model = _model(SMALL)
    fixed = FixedSubnet(model, SubnetConfig(6, 0.5))
    with pytest.raises(ValueError, match="g6_k0.5, not g8_k0.5"):
        export_subnet(fixed, SubnetConfig(8, 0.5))


@pytest.mark.slow
def test_compiled_program_matches_and_is_cached_per_weights():
    # Each program compiles its own exported code: a recompile limit of 1 must never be reached, however many
    # subnets a process compiles (compiling FixedSubnet.forward itself reached Dynamo's limit of 8).
    with torch._dynamo.config.patch(recompile_limit=1):
        _compiled_program_matches_and_is_cached_per_weights()


def _compiled_program_matches_and_is_cached_per_weights():
    clear_compiled_cache()
    model = _model(MICRO, num_classes=3)
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


@pytest.mark.slow
def test_measure_latency_modes_record_mode_and_compile_time():
    clear_compiled_cache()
    model = _model(MICRO, num_classes=3)
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


@pytest.mark.slow
def test_aot_package_takes_any_batch_size(tmp_path):
    model = _model(MICRO, num_classes=3)
    subnet = SubnetConfig(4, 0.5)
    path = package_subnet(model, subnet, tmp_path / "g4_k0.5.pt2")
    run = load_package(path)
    for batch in (1, 3):
        x = torch.randn(batch, 1, MICRO.img_size, MICRO.img_size)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x, subnet), rtol=1e-4, atol=1e-5)
