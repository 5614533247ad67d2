"""Deployable forms of a subnet: the fixed module and the exported program (any batch); compiled forms are in
tests/integration/test_compiled.py."""

import pytest
import torch

from helpers import SMALL, peaked_model
from supervit import FixedSubnet, SubnetConfig, export_subnet
from supervit.export import KeepTokensBlock

SUBNETS = [
    SubnetConfig(8, 1.0),
    SubnetConfig(8, 0.5),
    SubnetConfig(6, 0.7),
    SubnetConfig(4, 0.5),
    SubnetConfig(8, (0.9, 0.7, 0.5)),
    SubnetConfig(6, (1.0, 0.5, 0.7)),
    SubnetConfig(4, (0.5, 1.0, 0.3)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("subnet", SUBNETS, ids=str)
def test_fixed_subnet_equals_the_supernet_forward(subnet, dtype):
    model = peaked_model(SMALL, dtype)
    fixed = FixedSubnet(model, subnet)
    x = torch.randn(3, 3, SMALL.img_size, SMALL.img_size, dtype=dtype)
    with torch.no_grad():
        expected = model(x, subnet)
        assert torch.equal(fixed(x), expected)  # the same operations, in the same order
    assert expected.std() > 0.1


def test_fixed_subnet_holds_only_its_subnet_and_fixed_token_counts():
    model = peaked_model(SMALL)
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
    model = peaked_model(SMALL)
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
    model = peaked_model(SMALL)
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
    model = peaked_model(SMALL)
    fixed = FixedSubnet(model, SubnetConfig(6, 0.5))
    with pytest.raises(ValueError, match="g6_k0.5, not g8_k0.5"):
        export_subnet(fixed, SubnetConfig(8, 0.5))
