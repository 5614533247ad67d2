"""Presets, subnet validation and budget parsing."""

import pytest

from supervit import ArchConfig, SubnetConfig, get_arch, gflops, parse_budget


def test_presets():
    s = get_arch("deit_s")
    assert (s.patch_size, s.embed_dim, s.depth, s.num_heads, s.grids, s.prune_blocks) == (
        16,
        384,
        12,
        6,
        (8, 10, 12, 14),
        (3, 6, 9),
    )
    assert s.img_size == 224
    ti = get_arch("deit_ti")
    assert (ti.embed_dim, ti.num_heads) == (192, 3)
    tiny = get_arch("tiny")
    assert len(tiny.grids) >= 3 and 2 <= tiny.num_stages <= 3
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of deit_s, deit_ti, tiny"):
        get_arch("nope")


def test_arch_round_trip_and_validation():
    s = get_arch("deit_s")
    assert ArchConfig.from_dict(s.to_dict()) == s
    assert hash(ArchConfig.from_dict(s.to_dict())) == hash(s)
    with pytest.raises(ValueError, match="divisible"):
        ArchConfig(embed_dim=100, num_heads=6)
    with pytest.raises(ValueError, match="prune_blocks"):
        ArchConfig(prune_blocks=(3, 12))
    with pytest.raises(ValueError, match="unknown architecture fields"):
        ArchConfig.from_dict({**s.to_dict(), "colour": 1})


def test_subnet_is_frozen_hashable_and_expands():
    arch = get_arch("deit_s")
    a = SubnetConfig(14, 0.7)
    assert a.keep_rates == (0.7,)
    assert a.validate(arch) == SubnetConfig(14, (0.7, 0.7, 0.7))
    assert len({a.validate(arch), SubnetConfig(14, (0.7, 0.7, 0.7))}) == 1
    with pytest.raises(AttributeError):
        a.grid = 8
    sched = SubnetConfig(10, (0.9, 0.7, 0.5))
    assert sched.validate(arch) is sched
    assert sched.name == "g10_k0.9-0.7-0.5" and a.name == "g14_k0.7"
    assert SubnetConfig.parse(sched.name) == sched
    assert SubnetConfig.parse("g14_k0.7").validate(arch) == a.validate(arch)


@pytest.mark.parametrize(
    "subnet, message",
    [
        (SubnetConfig(13, 1.0), "grid 13 is not one of the architecture's grids"),
        (SubnetConfig(14, 0.0), r"keep rate 0.0 is outside \(0, 1\]"),
        (SubnetConfig(14, 1.5), r"keep rate 1.5 is outside \(0, 1\]"),
        (SubnetConfig(14, (0.5, 0.7)), "has 2 rates; the architecture has 3 pruning stages"),
    ],
)
def test_bad_subnets(subnet, message):
    with pytest.raises(ValueError, match=message):
        subnet.validate(get_arch("deit_s"))


def test_bad_subnet_construction():
    with pytest.raises(ValueError, match="grid must be an integer"):
        SubnetConfig("14", 0.5)
    with pytest.raises(ValueError, match="keep_rates must be"):
        SubnetConfig(14, ("a",))
    with pytest.raises(ValueError, match="cannot parse subnet"):
        SubnetConfig.parse("14x0.5")


@pytest.mark.parametrize(
    "text, expected",
    [("2.3GFLOPs", 2.3), ("2.3 GFLOPs", 2.3), ("2.3gflops", 2.3), ("450MFLOPs", 0.45), ("450 mflops", 0.45)],
)
def test_parse_budget(text, expected):
    assert parse_budget(text, get_arch("deit_s")) == pytest.approx(expected)


def test_parse_budget_fraction_of_full_model():
    arch = get_arch("deit_s")
    assert parse_budget("0.5x", arch) == pytest.approx(0.5 * gflops(arch))
    assert parse_budget("1X", arch) == pytest.approx(gflops(arch))


@pytest.mark.parametrize("text", ["2.3GFLOP", "-1GFLOPs", "abc", "0x", "", "2.3", "1e3 TFLOPs", "0GFLOPs"])
def test_bad_budgets(text):
    with pytest.raises(ValueError, match="accepted forms: 2.3GFLOPs"):
        parse_budget(text, get_arch("deit_s"))


def test_a_preset_is_defined_in_one_place():
    from pipeline.search.space import default_space_path, load_space
    from supervit import PRESETS, Preset, TrainConfig

    for name, preset in PRESETS.items():
        assert preset.name == name and isinstance(preset.train, TrainConfig)
        space = load_space(default_space_path(name))  # its search space file exists and fits
        assert space.preset == name
        space.check(preset.arch)
    with pytest.raises(TypeError):
        Preset(get_arch("tiny"), space="tiny.yaml")  # no training defaults: refused at definition
    with pytest.raises(TypeError):
        TrainConfig(epochs=1, batch_size=2)  # every training default must be given
    with pytest.raises(TypeError, match="TrainConfig"):
        Preset(get_arch("tiny"), {"epochs": 1}, "tiny.yaml")


def test_budget_is_parsed_once_then_resolved_per_architecture():
    from supervit import Budget

    b = Budget.parse(" 0.5x ")
    assert (b.text, b.value, b.relative) == ("0.5x", 0.5, True)
    assert b.gflops(get_arch("deit_s")) == pytest.approx(0.5 * gflops(get_arch("deit_s")))
    assert b.gflops(get_arch("tiny"), 10) == pytest.approx(0.5 * gflops(get_arch("tiny"), None, 10))
    assert Budget.parse("450MFLOPs").gflops(get_arch("tiny")) == pytest.approx(0.45)


def test_package_names_load_on_use():
    """Every name the package exports resolves to its submodule's object; a process that only reads data or
    configs (a Ray Data task, a small actor) does not import timm."""
    import importlib
    import subprocess
    import sys

    import supervit

    for name in supervit.__all__:
        assert getattr(supervit, name) is getattr(importlib.import_module(f"supervit.{supervit._EXPORTS[name]}"), name)
    with pytest.raises(AttributeError):
        supervit.no_such_name  # noqa: B018
    code = "import sys, supervit.data, supervit.config, pipeline.common.ledger; print('timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
