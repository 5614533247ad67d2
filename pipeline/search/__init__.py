"""`python -m pipeline.search`: budgeted subnet search on Ray Tune + Optuna, latency measured, tracked in MLflow.

Rooms, from the bottom: `space` (search spaces), `searcher` (Optuna behind Ray Tune), `options`
(`SearchOptions`), `trial` (one trial: typed context and result, latency), `select` (Pareto front, the choice
per budget), `plan` (a validated search), `latency_report` and `report` (what users read), `answers` (logging and
registering the answers), `command` (`search` and `main`, on top).
"""

from .command import SearchResult, main, search
from .options import EXPERIMENT, SearchOptions

__all__ = ["EXPERIMENT", "SearchOptions", "SearchResult", "search", "main"]
