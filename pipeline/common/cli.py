"""Command-line plumbing: a command's options dataclass is its parser, and bad input is one line with status 2.

Each command declares its options once, as a dataclass whose fields carry their help text in metadata
(`option`). `parse_options` builds the argparse parser from those fields (flags, types, choices; defaults
stay in the dataclass), reads ``--config FILE.yaml`` for the same options, and checks the declared bounds, so
a default or a bound is written in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "Parser", "option", "build_parser", "parse_options", "run_cli", "quiet_libraries"]


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as `UsageError`: one line and exit status 2, like every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | tuple[str, ...] | None = None,
    choices: tuple | None = None,
    metavar: str | None = None,
    min: float | None = None,
    nargs: str | None = None,
    const: Any = None,
    cli: bool = True,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: The option's one default.
        help: Help text (the default is appended by the parser).
        flag: Command-line flag, or flags (default ``--<name with dashes>``).
        choices: Accepted values.
        metavar: Placeholder in ``--help``.
        min: Smallest accepted value (checked for the CLI, a config file and direct callers alike).
        nargs: ``"?"`` for a flag that may come without its value, which is then ``const``.
        const: The value of a ``nargs="?"`` flag given alone.
        cli: False for fields that tests and resumes set but users do not.
        factory: ``default_factory`` for mutable defaults.
    """
    meta = dict(help=help, flag=flag, choices=choices, metavar=metavar, min=min, nargs=nargs, const=const, cli=cli)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# Options both commands take, defined once.
def decode_cpus_option() -> Any:
    """``--decode-cpus``: CPUs per Ray Data task that reads, decodes and augments file-backed images."""
    return option(1.0, help="CPUs per image-decoding task of file-backed data (Ray Data)", min=0.01)


def max_bad_images_option() -> Any:
    """``--max-bad-images``: undecodable images a run skips before it stops with one line naming them."""
    return option(10, help="undecodable images skipped (each named in a warning) before the run stops", min=0)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(scalar type, is a list) of a field's type hint: ``int | None`` -> int, ``list[str]`` -> (str, True)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING or f.default is None or isinstance(f.default, bool):
        return ""
    return f" (default {f.default})"


def build_parser(options_type: type, prog: str, description: str) -> Parser:
    """The parser of an options dataclass: one flag per `option` field, values left unset unless given.

    Unset flags are absent from the parsed namespace (``argparse.SUPPRESS``), so the dataclass's own defaults
    apply and a ``--config`` file can fill what the command line leaves out.
    """
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options (flags override it)")
    p.add_argument("--verbose", action="store_true", help="show Ray's, MLflow's and Optuna's own log lines")
    hints = typing.get_type_hints(options_type)
    for f in dataclasses.fields(options_type):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flags = meta["flag"] or "--" + f.name.replace("_", "-")
        flags = (flags,) if isinstance(flags, str) else flags
        kind, many = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"] + _default_text(f)}
        if kind is bool:
            # True/False defaults get the flag that changes them; None (a recipe's choice) gets both.
            if f.default is True:
                p.add_argument(*("--no-" + f[2:] for f in flags), action="store_false", **kw)
            elif f.default is False:
                p.add_argument(*flags, action="store_true", **kw)
            else:
                p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw.update(type=kind, choices=meta["choices"], metavar=meta["metavar"])
        if many:
            kw["action"] = "append"
        if meta["nargs"]:
            kw.update(nargs=meta["nargs"], const=meta["const"])
        p.add_argument(*flags, **kw)
    return p


def _coerce(options_type: type, name: str, value: Any, where: str) -> Any:
    """A config file's value as the field's type (YAML may give ``3`` for a float, or a string for a list)."""
    kind, many = _base_type(typing.get_type_hints(options_type)[name])
    if value is None:
        return None
    try:
        if many:
            return [kind(v) for v in (value if isinstance(value, list) else [value])]
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        return kind(value) if kind in (int, float, str) else value
    except (TypeError, ValueError):
        raise UsageError(f"{where}: option {name} must be {kind.__name__}, got {value!r}") from None


def _read_config(path: str, options_type: type) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, OSError) as e:
        raise UsageError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(options_type) if f.metadata.get("cli", True)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"config file {path}: unknown options {', '.join(unknown)}")
    return {k: _coerce(options_type, k, v, f"config file {path}") for k, v in data.items()}


def check_bounds(opts: Any) -> None:
    """Raise `UsageError` for a field below its declared ``min``."""
    for f in dataclasses.fields(opts):
        low, value = f.metadata.get("min"), getattr(opts, f.name)
        if low is not None and value is not None and value < low:
            raise UsageError(f"--{f.name.replace('_', '-')} must be at least {low:g}, got {value}")


def parse_options(options_type: type, argv: list[str] | None, prog: str, description: str) -> tuple[Any, bool]:
    """Parse ``argv`` (over ``--config``'s values, over the dataclass defaults) into ``options_type``.

    Returns:
        ``(options, verbose)``.
    """
    args = vars(build_parser(options_type, prog, description).parse_args(argv))
    config, verbose = args.pop("config", None), args.pop("verbose", False)
    values = {**(_read_config(config, options_type) if config else {}), **args}
    opts = options_type(**values)
    check_bounds(opts)
    return opts, verbose


def quiet_libraries(verbose: bool) -> None:
    """Keep Ray's, MLflow's and Optuna's internals at their own log level unless ``verbose``.

    Set before Ray starts: the environment variables reach every Ray process this command starts.
    """
    if verbose:
        return
    # Ray's train/tune progress reporters and the per-epoch checkpoint lines are replaced by ours.
    os.environ.setdefault("RAY_TRAIN_V2_PRINT_REPORTS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("ray", "ray.train", "ray.tune", "ray.data", "mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray.*")


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a command's ``main``, turning bad input into one line on stderr and exit status 2."""
    from supervit.checkpoint import CheckpointError
    from supervit.data import DataError

    try:
        main(argv)
    except (UsageError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
