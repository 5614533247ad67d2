"""`python -m pipeline.serve`: one supernet on Ray Serve, the subnet chosen per request and per load.

Rooms, from the bottom: `policy` (which rung answers a batch: pure functions), `options` (`ServeOptions`), `ladder`
(a finished search's supernet and front, read from MLflow), `replica` (the Serve deployment: programs, batching,
HTTP), `pyfunc` (the ladder as one MLflow model), `command` (`start` and `main`, on top). Importing this package
imports none of them (the pyfunc model imports `policy` alone, without Ray).
"""

import importlib
from typing import Any

_EXPORTS = {"ServeOptions": "options", "Server": "command", "start": "command", "main": "command"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
