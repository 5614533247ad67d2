"""The search algorithm: Optuna proposes subnets, and only new ones within the FLOPs budget reach Ray Tune.

`BudgetedOptunaSearch` is a Ray Tune `Searcher` over Optuna's ask/tell interface. It owns its Optuna study
(persisted where the caller says, so ``optuna-dashboard`` can open it) and needs no running Ray: tests drive
`suggest` and `on_trial_complete` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ray.tune.search import Searcher

from supervit import ArchConfig, SubnetConfig, gflops

from ..common.cli import UsageError
from .space import SearchSpace

__all__ = ["SAMPLERS", "make_sampler", "BudgetedOptunaSearch"]

SAMPLERS = ("tpe", "nsga2", "random", "grid")


def make_sampler(name: str, space: SearchSpace, seed: int, trials: int):
    """A seeded Optuna sampler; TPE and NSGA-II take the constraints (FLOPs, latency) into account."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, trials // 3))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 4)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.choices(), seed=seed)
    raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


class BudgetedOptunaSearch(Searcher):
    """Optuna's proposals, filtered by the FLOPs budget, for Ray Tune.

    Each proposal's analytic FLOPs are checked in `suggest`: one over budget is told to Optuna at once as
    infeasible (constraint ``flops`` > 0) and never run; one already evaluated is told its known result instead
    of being run again; one running right now is dropped. A latency budget, known only after a trial, is a
    second constraint. When every subnet within the budget has been evaluated, the search is finished.

    Args:
        space: The search space.
        arch: The supernet's architecture (for FLOPs).
        num_classes: Classifier outputs (for FLOPs).
        budget: FLOPs budget in GFLOPs.
        metric: Tune metric(s) to optimise: ``top1``, or ``["top1", "latency_ms"]``.
        mode: ``max``, or one mode per metric.
        sampler: An Optuna sampler (`make_sampler`).
        latency_budget: Latency constraint in ms, or None.
        known: Results of subnets evaluated earlier (metric name -> value): added to the study as finished
            trials and never run again (a resumed search).
        warm_start: Subnets to evaluate first (enqueued, unless known).
        storage: Optuna storage (e.g. a ``JournalStorage``) to persist the study in; None keeps it in memory.
        study_name: The study's name in ``storage``; an existing study of that name is replaced.
        stop: Asked before each proposal; True finishes the search (a condition no trial can survive).
        max_tries: Proposals a single `suggest` may rule out before giving up.
    """

    def __init__(
        self,
        space: SearchSpace,
        arch: ArchConfig,
        num_classes: int,
        budget: float,
        *,
        metric: str | list[str],
        mode: str | list[str],
        sampler,
        latency_budget: float | None = None,
        known: Mapping[SubnetConfig, Mapping[str, float]] | None = None,
        warm_start: Iterable[SubnetConfig] = (),
        storage=None,
        study_name: str | None = None,
        stop: Callable[[], bool] | None = None,
        max_tries: int = 10_000,
    ) -> None:
        import optuna

        super().__init__(metric=metric, mode=mode)
        self.space, self.arch, self.num_classes = space, arch, num_classes
        self.budget, self.latency_budget, self.max_tries, self.stop = budget, latency_budget, max_tries, stop
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        modes = [mode] if isinstance(mode, str) else list(mode)
        self._worst = [0.0 if m == "max" else 1e9 for m in modes]
        self._distributions = {
            name: optuna.distributions.CategoricalDistribution(choices) for name, choices in space.choices().items()
        }
        if storage is not None and study_name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            optuna.delete_study(study_name=study_name, storage=storage)  # a resume rebuilds it from `known`
        self.study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=sampler,
            directions=["maximize" if m == "max" else "minimize" for m in modes],
        )
        self.feasible = {s.validate(arch) for s in space.subnets() if self._excess(s) <= 0}
        self.known: dict[SubnetConfig, dict[str, float]] = {}
        self.running: dict[str, tuple[optuna.Trial, SubnetConfig]] = {}  # Tune trial id -> Optuna trial, subnet
        self.ruled_out = 0
        for subnet, result in (known or {}).items():
            self._add_known(subnet.validate(arch), result)
        for subnet in warm_start:
            if subnet.validate(arch) not in self.known:
                self.study.enqueue_trial(space.params(subnet.validate(arch)))

    def _excess(self, subnet: SubnetConfig) -> float:
        return gflops(self.arch, subnet, self.num_classes) - self.budget - 1e-12

    def _constraints(self, subnet: SubnetConfig, result: Mapping[str, float] | None) -> dict[str, float]:
        """Optuna constraints (<= 0 is feasible): FLOPs, and latency once measured."""
        out = {"flops": self._excess(subnet)}
        if self.latency_budget is not None and result is not None:
            out["latency"] = result["latency_ms"] - self.latency_budget
        return out

    def _values(self, result: Mapping[str, float] | None) -> list[float]:
        return [result[m] for m in self.metrics] if result else list(self._worst)

    def _add_known(self, subnet: SubnetConfig, result: Mapping[str, float]) -> None:
        import optuna

        self.known[subnet] = {m: float(result[m]) for m in {*self.metrics, "latency_ms"} if m in result}
        self.study.add_trial(
            optuna.trial.create_trial(
                params=self.space.params(subnet),
                distributions=self._distributions,
                values=self._values(self.known[subnet]),
                constraints=self._constraints(subnet, self.known[subnet]),
            )
        )

    def _tell(self, trial, subnet: SubnetConfig, result: Mapping[str, float] | None) -> None:
        for key, value in self._constraints(subnet, result).items():
            trial.set_constraint(key, value)
        self.study.tell(trial, self._values(result))

    def suggest(self, trial_id: str) -> dict | str | None:
        """A new subnet within the budget (as Tune config), None to wait for running trials, or FINISHED."""
        import optuna

        if self.stop is not None and self.stop():
            return Searcher.FINISHED
        for _ in range(self.max_tries):
            pending = {s for _, s in self.running.values()}
            if self.feasible <= set(self.known) | pending:
                return None if pending else Searcher.FINISHED
            trial = self.study.ask(self._distributions)
            subnet = self.space.subnet(trial.params).validate(self.arch)
            if subnet in pending:  # proposed again while it runs: not a result either way
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            elif subnet in self.feasible and subnet not in self.known:
                trial.set_constraint("flops", self._excess(subnet))
                self.running[trial_id] = (trial, subnet)
                return dict(trial.params)
            else:
                self.ruled_out += subnet not in self.known
                self._tell(trial, subnet, self.known.get(subnet))
        raise RuntimeError(f"no new proposal within {self.budget:.4g} GFLOPs after {self.max_tries} tries")

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna the trial's result (or its failure)."""
        import optuna

        trial, subnet = self.running.pop(trial_id, (None, None))
        if trial is None:
            return
        if error or not result or any(m not in result for m in self.metrics):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        self.known[subnet] = {m: float(result[m]) for m in {*self.metrics, "latency_ms"} if m in result}
        for key, value in self._constraints(subnet, result).items():
            if key != "flops":  # set when proposed
                trial.set_constraint(key, value)
        self.study.tell(trial, self._values(result))
