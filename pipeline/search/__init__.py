"""`python -m pipeline.search`: budgeted subnet search on Ray Tune + Optuna, latency measured, tracked in MLflow.

Rooms, from the bottom: `space` (search spaces), `searcher` (Optuna behind Ray Tune), `options`
(`SearchOptions`), `latency` (whole programs and parts, from the shared table or measured), `trial` (one trial:
typed context and result), `select` (Pareto front, the choice per budget), `plan` (a validated search), `verify`
(the calibration trials use; what the answers rest on, measured whole), `latency_report` and `report` (what users
read), `answers` (logging and registering the answers), `command` (`search` and `main`, on top).
"""

from .command import SearchResult, main, search
from .options import EXPERIMENT, SearchOptions

__all__ = ["EXPERIMENT", "SearchOptions", "SearchResult", "search", "main"]
