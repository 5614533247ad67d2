"""SuperViT forward: agreement with timm's DeiT-S, token keeping against a plain reference, FLOPs."""

import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from helpers import SMALL
from supervit import SubnetConfig, SuperViT, get_arch, gflops, keep_count
from supervit.checkpoint import convert_state_dict
from supervit.flops import token_counts

# torch has no FLOP formula for the CPU flash-attention kernel: register the standard SDPA one.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@pytest.fixture(scope="module")
def deit_pair():
    torch.manual_seed(0)
    ref = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    with torch.no_grad():  # a non-trivial head, so logits differ across inputs and classes
        ref.head.weight.normal_(std=0.05)
        ref.head.bias.normal_(std=0.05)
    ours = SuperViT(get_arch("deit_s")).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours))
    return ref, ours


def test_full_config_matches_timm_deit_small(deit_pair):
    ref, ours = deit_pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x, SubnetConfig(14, 1.0))
        assert torch.equal(ours(x), got)  # None is the full model
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _reference_forward(model: SuperViT, x: torch.Tensor, subnet: SubnetConfig) -> torch.Tensor:
    """Plain ViT forward with explicit attention matrices and the seed's top-k rule, written from scratch."""
    arch = model.arch
    subnet = subnet.validate(arch)
    size = subnet.grid * arch.patch_size
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    w, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    tokens = torch.nn.functional.conv2d(x, w, b, stride=arch.patch_size).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], 1)
    t = tokens + model.pos_embed_list[arch.grids.index(subnet.grid)]
    for i, blk in enumerate(model.blocks):
        B, N, C = t.shape
        H = arch.num_heads
        h = torch.nn.functional.layer_norm(t, (C,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1)  # B, H, N, N
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        t = t + out @ blk.attn.proj.weight.T + blk.attn.proj.bias
        if i in arch.prune_blocks:
            rate = subnet.keep_rates[arch.prune_blocks.index(i)]
            n_keep = min(N - 1, math.ceil(rate * N))
            score = attn[:, :, 0, 1:].mean(dim=1)  # class-token row, averaged over heads
            idx = score.argsort(dim=1, descending=True)[:, :n_keep] + 1
            t = torch.cat([t[:, :1], torch.stack([t[j, idx[j]] for j in range(B)])], 1)
        h = torch.nn.functional.layer_norm(t, (C,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
        h = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        t = t + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    t = torch.nn.functional.layer_norm(t, (t.shape[-1],), model.norm.weight, model.norm.bias, eps=1e-6)
    return t[:, 0] @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize(
    "subnet",
    [
        SubnetConfig(8, 0.5),
        SubnetConfig(8, 0.7),
        SubnetConfig(6, 0.5),
        SubnetConfig(4, 0.7),
        SubnetConfig(8, (0.9, 0.7, 0.5)),
        SubnetConfig(6, (1.0, 0.5, 0.7)),
        SubnetConfig(4, (0.5, 1.0, 0.3)),
    ],
    ids=str,
)
def test_token_keeping_matches_reference(subnet):
    torch.manual_seed(1)
    # float64 so near-ties in attention rank the same way in both implementations
    model = SuperViT(SMALL, num_classes=7).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: peaked attention, distinct rankings
            p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(model(x, subnet), _reference_forward(model, x, subnet), atol=1e-9, rtol=1e-9)


def test_kept_token_counts_follow_the_seed_rule():
    model = SuperViT(SMALL, num_classes=3).eval()
    subnet = SubnetConfig(8, (0.7, 0.5, 0.5))
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), subnet)
    for h in hooks:
        h.remove()
    n, expected = 65, []
    for i in range(SMALL.depth):
        if i in SMALL.prune_blocks:
            n = 1 + keep_count(n, subnet.keep_rates[SMALL.prune_blocks.index(i)])
        expected.append(n)
    assert seen == expected == [n_mlp for _, n_mlp in token_counts(SMALL, subnet)]
    assert expected[1] == 1 + math.ceil(0.7 * 65)  # n counts the class token


def test_keep_count_rule():
    assert keep_count(197, 0.5) == 99  # ceil(98.5)
    assert keep_count(197, 0.7) == 138
    assert keep_count(197, 1.0) == 196  # never more patch tokens than there are


def test_input_of_any_size_is_resized_to_the_grid():
    model = SuperViT(SMALL, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x, SubnetConfig(4, 1.0)), model(small, SubnetConfig(4, 1.0)))


def test_deit_s_gflops_is_the_papers_4_6():
    assert gflops(get_arch("deit_s")) == pytest.approx(4.6, abs=0.05)


# The SuperViT paper's FLOPs table for DeiT-S: grid -> GFLOPs at keep 0.5, 0.7, 1.0.
PAPER_GFLOPS = {
    8: (0.742, 0.972, 1.438),
    10: (1.155, 1.515, 2.268),
    12: (1.668, 2.194, 3.315),
    14: (2.298, 3.013, 4.599),
}


@pytest.mark.parametrize("grid", sorted(PAPER_GFLOPS))
def test_deit_s_gflops_match_the_papers_table(grid):
    arch = get_arch("deit_s")
    for rate, paper in zip((0.5, 0.7, 1.0), PAPER_GFLOPS[grid], strict=True):
        assert gflops(arch, SubnetConfig(grid, rate)) == pytest.approx(paper, abs=0.002), (grid, rate)


def test_gflops_matches_torch_flop_counter_on_seed_cells():
    arch = get_arch("deit_s")
    model = SuperViT(arch).eval()
    x = torch.randn(1, 3, 224, 224)
    for grid in arch.grids:
        for rate in (0.5, 0.7, 1.0):
            subnet = SubnetConfig(grid, rate)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x, subnet)
            counted = counter.get_total_flops() / 2 / 1e9  # the counter counts 2 per multiply-add
            assert counted > 0
            assert gflops(arch, subnet) == pytest.approx(counted, rel=0.01), subnet


def test_gflops_decrease_with_grid_and_keep_rate():
    arch = get_arch("deit_s")
    values = [[gflops(arch, SubnetConfig(g, r)) for r in (0.5, 0.7, 1.0)] for g in arch.grids]
    for row in values:
        assert row == sorted(row)
    for col in zip(*values, strict=True):
        assert list(col) == sorted(col)
