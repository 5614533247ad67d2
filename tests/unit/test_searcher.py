"""BudgetedOptunaSearch driven directly, as Tune drives it, with no Ray running."""

import optuna
import pytest
from ray.tune.search import Searcher

from pipeline.search.searcher import BudgetedOptunaSearch, make_sampler
from pipeline.search.space import SPACES_DIR, load_space
from supervit import SubnetConfig, get_arch, gflops

ARCH = get_arch("tiny")
SPACE = load_space(SPACES_DIR / "tiny.yaml")
BUDGET = 0.5 * gflops(ARCH, None, 10)


def _top1(subnet: SubnetConfig) -> float:
    """A made-up accuracy that grows with FLOPs (what a supernet roughly shows)."""
    return 50.0 + 3000.0 * gflops(ARCH, subnet, 10)


def _searcher(**kw) -> BudgetedOptunaSearch:
    base = dict(metric="top1", mode="max", sampler=make_sampler("tpe", SPACE, 0, 40))
    return BudgetedOptunaSearch(SPACE, ARCH, 10, BUDGET, **{**base, **kw})


def _run(searcher: BudgetedOptunaSearch, n: int) -> list[SubnetConfig]:
    """Suggest and complete up to ``n`` trials one at a time; the subnets run."""
    ran = []
    for i in range(n):
        config = searcher.suggest(str(i))
        if config == Searcher.FINISHED:
            break
        subnet = SPACE.subnet(config).validate(ARCH)
        ran.append(subnet)
        searcher.on_trial_complete(str(i), {"top1": _top1(subnet), "latency_ms": 1.0})
    return ran


def test_only_new_subnets_within_the_budget_are_run_and_the_search_ends():
    searcher = _searcher()
    feasible = {s.validate(ARCH) for s in SPACE.subnets() if gflops(ARCH, s, 10) <= BUDGET}
    ran = _run(searcher, 200)
    assert all(gflops(ARCH, s, 10) <= BUDGET for s in ran)  # nothing over budget ran
    assert len(ran) == len(set(ran))  # nothing ran twice
    assert set(ran) == feasible  # ... and once every feasible subnet is known, the search is finished
    assert searcher.suggest("last") == Searcher.FINISHED
    assert searcher.ruled_out > 0  # proposals over budget were told to Optuna, not run
    over = [t for t in searcher.study.trials if t.constraints["flops"] > 0]
    assert over and all(t.state == optuna.trial.TrialState.COMPLETE and t.value == 0.0 for t in over)


def test_known_results_are_never_run_again_and_warm_start_goes_first():
    uniform = [s for s in SPACE.uniform_subnets() if gflops(ARCH, s, 10) <= BUDGET]
    known = {uniform[0].validate(ARCH): {"top1": 90.0, "latency_ms": 2.0}}
    searcher = _searcher(known=known, warm_start=uniform)
    done = searcher.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 1 and done[0].value == 90.0  # the known result, as a finished trial
    waiting = searcher.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == len(uniform) - 1  # the warm start, queued
    ran = _run(searcher, len(uniform) - 1)
    assert ran == [u.validate(ARCH) for u in uniform[1:]]  # the warm start, in order, minus the known subnet
    assert uniform[0].validate(ARCH) not in _run(searcher, 50)


def test_a_subnet_running_now_is_not_proposed_twice():
    searcher = _searcher(sampler=make_sampler("random", SPACE, 0, 40))
    running = {SPACE.subnet(searcher.suggest(str(i))).validate(ARCH) for i in range(5)}
    assert len(running) == 5  # five different subnets in flight at once


def test_latency_budget_is_a_constraint_once_measured():
    searcher = _searcher(latency_budget=1.5)
    config = searcher.suggest("a")
    searcher.on_trial_complete("a", {"top1": 95.0, "latency_ms": 2.0})
    trial = searcher.study.trials[-1]
    assert trial.params == config and trial.constraints == {
        "flops": pytest.approx(trial.constraints["flops"]),
        "latency": pytest.approx(0.5),
    }
    assert trial.constraints["flops"] <= 0


def test_pareto_objective_and_failed_trials():
    searcher = _searcher(
        metric=["top1", "latency_ms"], mode=["max", "min"], sampler=make_sampler("nsga2", SPACE, 0, 40)
    )
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"top1": 91.0, "latency_ms": 1.2})
    assert searcher.study.trials[-1].values == [91.0, 1.2]
    searcher.suggest("b")
    searcher.on_trial_complete("b", None, error=True)
    assert searcher.study.trials[-1].state == optuna.trial.TrialState.FAIL


def test_study_is_persisted_and_replaced_on_resume(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.journal")))
    first = _searcher(storage=storage, study_name="s")
    ran = _run(first, 3)
    known = {s: {"top1": _top1(s), "latency_ms": 1.0} for s in ran}
    again = optuna.load_study(study_name="s", storage=storage)
    assert len([t for t in again.trials if t.constraints["flops"] <= 0]) == 3
    _searcher(storage=storage, study_name="s", known=known)  # a resumed search rebuilds the study from its results
    rebuilt = optuna.load_study(study_name="s", storage=storage).trials
    assert len(rebuilt) == 3 and {SPACE.subnet(t.params) for t in rebuilt} == set(ran)
