"""Search spaces as data: ``search_spaces/<preset>.yaml`` holds token grids and per-stage keep-rate choices.

The YAML is the only place a space is written; the Optuna define-by-run function, the grid sampler's table,
the exhaustive enumeration and the warm-start points are all derived from one `SearchSpace`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from supervit import ArchConfig, SubnetConfig

from ..common.cli import UsageError

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


@dataclass(frozen=True)
class SearchSpace:
    """Token grids and, per pruning stage, the keep rates a schedule may take."""

    preset: str
    grids: tuple[int, ...]
    keep_rates: tuple[tuple[float, ...], ...]

    def choices(self) -> dict[str, list]:
        """Each parameter's choices (the grid sampler's table)."""
        return {"grid": list(self.grids)} | {f"keep{i}": list(c) for i, c in enumerate(self.keep_rates)}

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run function: defines the parameters, nothing else."""
        for name, options in self.choices().items():
            trial.suggest_categorical(name, options)

    def subnet(self, params: dict) -> SubnetConfig:
        """The subnet a parameter set names."""
        return SubnetConfig(int(params["grid"]), tuple(float(params[f"keep{i}"]) for i in range(len(self.keep_rates))))

    def params(self, subnet: SubnetConfig) -> dict:
        """Inverse of `subnet`."""
        return {"grid": subnet.grid} | {f"keep{i}": r for i, r in enumerate(subnet.keep_rates)}

    def subnets(self) -> list[SubnetConfig]:
        """Every subnet of the space."""
        return [SubnetConfig(g, rates) for g in self.grids for rates in itertools.product(*self.keep_rates)]

    def uniform_subnets(self) -> list[SubnetConfig]:
        """The subnets with one keep rate at every stage (the paper's table)."""
        common = set(self.keep_rates[0]).intersection(*self.keep_rates[1:])
        return [SubnetConfig(g, (r,) * len(self.keep_rates)) for g in self.grids for r in sorted(common)]

    def check(self, arch: ArchConfig, where: str = "search space") -> None:
        """Raise `UsageError` unless every subnet of the space is one ``arch`` serves and was trained on."""
        bad_grids = [g for g in self.grids if g not in arch.grids]
        if bad_grids:
            raise UsageError(f"{where}: grids {bad_grids} are not grids of preset {arch.name} {list(arch.grids)}")
        if len(self.keep_rates) != arch.num_stages:
            raise UsageError(
                f"{where}: {len(self.keep_rates)} stages of keep rates, preset {arch.name} has {arch.num_stages}"
            )
        for i, rates in enumerate(self.keep_rates):
            untrained = [r for r in rates if r not in arch.keep_rates]
            if untrained:
                raise UsageError(
                    f"{where}: stage {i + 1} keep rates {untrained} were not trained (preset {arch.name} trains "
                    f"{list(arch.keep_rates)})"
                )


def load_space(path: str | Path) -> SearchSpace:
    """Read and check the shape of a space YAML; any problem is a `UsageError` naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"search space {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"search space {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) != {"preset", "grids", "keep_rates"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"search space {path} must have exactly the keys preset, grids, keep_rates (found {found})")
    try:
        grids = tuple(int(g) for g in data["grids"])
        rates = tuple(tuple(float(r) for r in stage) for stage in data["keep_rates"])
    except (TypeError, ValueError):
        raise UsageError(
            f"search space {path}: grids must be a list of integers, keep_rates a list of lists of "
            "numbers (one list per pruning stage)"
        ) from None
    if not grids or not rates or any(not s for s in rates):
        raise UsageError(f"search space {path}: grids and every stage's keep rates must be non-empty")
    if any(not 0.0 < r <= 1.0 for s in rates for r in s):
        raise UsageError(f"search space {path}: keep rates must lie in (0, 1]")
    return SearchSpace(str(data["preset"]), tuple(sorted(set(grids))), tuple(tuple(sorted(set(s))) for s in rates))


def default_space_path(preset: str) -> Path:
    """The preset's search space file, ``search_spaces/<Preset.space>`` (``<preset>.yaml`` for an unknown name)."""
    from supervit import PRESETS

    return SPACES_DIR / (PRESETS[preset].space if preset in PRESETS else f"{preset}.yaml")
