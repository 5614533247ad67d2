"""Every search-space YAML loads and fits its preset; bad spaces are clear errors."""

import pytest

from pipeline.common.cli import UsageError
from pipeline.search.space import SPACES_DIR, load_space
from supervit import get_arch, gflops


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_space_fits_its_preset(path):
    space = load_space(path)
    assert path.stem == space.preset
    arch = get_arch(space.preset)
    space.check(arch)
    subnets = space.subnets()
    assert len(subnets) == len(space.grids) * len(space.keep_rates[0]) ** arch.num_stages
    assert arch.largest in {s.validate(arch) for s in subnets}
    assert all(0 < gflops(arch, s) <= gflops(arch) for s in subnets)
    assert set(space.uniform_subnets()) <= set(subnets)


def test_spaces_exist_for_presets():
    assert {p.stem for p in SPACES_DIR.glob("*.yaml")} >= {"tiny", "deit_s"}


def test_round_trip_of_params():
    space = load_space(SPACES_DIR / "tiny.yaml")
    for s in space.subnets():
        assert space.subnet(space.params(s)) == s


@pytest.mark.parametrize(
    "text, message",
    [
        ("preset: tiny\ngrids: [4]\n", "must have exactly the keys"),
        ("preset: tiny\ngrids: [four]\nkeep_rates: [[1.0]]\n", "grids must be a list of integers"),
        ("preset: tiny\ngrids: [4]\nkeep_rates: [[1.5], [1], [1]]\n", r"keep rates must lie in \(0, 1\]"),
        ("preset: tiny\ngrids: [4]\nkeep_rates: [[]]\n", "must be non-empty"),
        ("preset: [tiny\n", "not valid YAML"),
    ],
)
def test_malformed_spaces(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_space(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_space(tmp_path / "absent.yaml")


def test_space_that_does_not_fit_the_architecture():
    tiny = get_arch("tiny")
    with pytest.raises(UsageError, match=r"grids \[10, 12, 14\] are not grids of preset tiny"):
        load_space(SPACES_DIR / "deit_s.yaml").check(tiny)
    space = load_space(SPACES_DIR / "tiny.yaml")
    from pipeline.search.space import SearchSpace

    with pytest.raises(UsageError, match="stage 1 keep rates \\[0.6\\] were not trained"):
        SearchSpace("tiny", (4,), ((0.6,), (1.0,), (1.0,))).check(tiny)
    with pytest.raises(UsageError, match="2 stages of keep rates, preset tiny has 3"):
        SearchSpace("tiny", space.grids, space.keep_rates[:2]).check(tiny)
