"""The supertraining's console: lines from any Ray process, printed by the driver."""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["Console", "progress_text"]


def progress_text(what: str, step: int, steps: int, width: int = 30) -> str:
    """A progress bar line: ``  epoch 3/300 [#########.....] 2100/5000 steps``."""
    done = int(width * step / max(1, steps))
    return f"  {what} [{'#' * done}{'.' * (width - done)}] {step}/{steps} steps"


class Console:
    """The command's console, fed from any Ray process: epoch lines and progress go through a Ray queue that
    a thread of the driver prints, so users read one clean line per epoch instead of Ray's worker logs."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread: Any = None
        self._bar_open = False

    def __getstate__(self) -> dict:
        return {"queue": self.queue}  # only the queue travels to workers

    def __setstate__(self, state: dict) -> None:
        self.queue = state["queue"]

    def line(self, text: str) -> None:
        """Print ``text`` on the driver's console."""
        self.queue.put(("line", text))

    def progress(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        """Progress within a long epoch."""
        self.queue.put(("progress", f"epoch {epoch + 1}/{epochs}", step, steps))

    def __enter__(self) -> Console:
        self._thread = threading.Thread(target=self._print_loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        self.queue.shutdown()

    def _print_loop(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._show(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue actor is gone: Ray is shutting down
                return

    def _drain(self) -> None:
        from ray.util.queue import Empty

        try:
            while True:
                self._show(self.queue.get_nowait())
        except Empty:
            pass

    def _show(self, item: tuple) -> None:
        if item[0] == "progress":
            text = progress_text(*item[1:])
            if sys.stdout.isatty():
                print("\r" + text, end="", flush=True)
                self._bar_open = True
            else:
                print(text, flush=True)
            return
        if self._bar_open:
            print("\r" + " " * 80 + "\r", end="")
            self._bar_open = False
        print(item[1], flush=True)
