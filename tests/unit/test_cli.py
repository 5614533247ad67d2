"""The command lines are generated from the options dataclasses: every field a flag, defaults in one place."""

import dataclasses

import pytest

from pipeline.common.cli import UsageError, build_parser, parse_options
from pipeline.search import SearchOptions
from pipeline.supertrain import SupertrainOptions


@pytest.mark.parametrize("options", [SupertrainOptions, SearchOptions])
def test_every_option_is_a_flag_with_help_and_no_default_of_its_own(options):
    parser = build_parser(options, "prog", "")
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(options):
        if not f.metadata["cli"]:
            assert f.name not in actions
            continue
        assert f.name in actions and actions[f.name].help, f.name
        assert actions[f.name].default == "==SUPPRESS==", f.name  # the dataclass holds the default
    assert parse_options(options, [], "prog", "")[0] == options()  # no flag: the dataclass's defaults


def test_flags_types_and_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 7\nlr: 1\nrecipe: seed\nschedules: true\n")
    opts, verbose = parse_options(
        SupertrainOptions, ["--config", str(config), "--epochs", "3", "--no-schedules", "--run-name", "x"], "p", ""
    )
    assert (opts.epochs, opts.lr, opts.recipe, opts.schedules, opts.name, verbose) == (
        3,
        1.0,
        "seed",
        False,
        "x",
        False,
    )
    assert isinstance(opts.lr, float)  # YAML's 1 becomes the field's type
    opts, verbose = parse_options(SearchOptions, ["--budget", "0.5x", "--budget", "2GFLOPs", "--verbose"], "p", "")
    assert opts.budgets == ["0.5x", "2GFLOPs"] and verbose and opts.warm_start
    assert parse_options(SearchOptions, ["--no-warm-start", "--resume"], "p", "")[0].resume == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be at least 1"),
        (["--epochs", "x"], "invalid int value: 'x'"),
        (["--pos-init", "zeros"], "invalid choice: 'zeros'"),
        (["--inject-failure", "1"], "unrecognized arguments: --inject-failure"),  # not a user option
    ],
)
def test_bad_flags(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_options(SupertrainOptions, argv, "p", "")


def test_recipe_decides_whether_schedules_are_trained():
    assert SupertrainOptions().resolved().schedules is True
    assert SupertrainOptions(recipe="seed").resolved().schedules is False  # the paper: one rate for all stages
    assert SupertrainOptions(recipe="seed", schedules=True).resolved().schedules is True
    tiny = SupertrainOptions().resolved()
    assert (tiny.epochs, tiny.batch_size, tiny.lr) == (20, 32, 1e-3)  # the preset's training defaults
    assert SupertrainOptions(preset="deit_s", epochs=5).resolved().train_config().epochs == 5
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        SupertrainOptions(preset="huge").resolved()
