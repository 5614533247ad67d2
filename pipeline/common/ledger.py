"""The run-wide record of undecodable images: a small Ray actor shared by a run's workers, trials and restarts.

Its own module, importing nothing heavy: the actor's process imports only this file, not torch."""

__all__ = ["BadImageLedger", "start_ledger"]


class BadImageLedger:
    """The undecodable images of a whole run, across its workers, trials and restarts (a Ray actor).

    A worker's `BadImages` counts what that worker met; the cap a user sets (``--max-bad-images``) is for the
    run, so each newly met file is added here, and the run stops once more than ``cap`` distinct files are bad.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.names: dict[str, str] = {}  # file -> "<file>: <reason>", in the order first met

    def add(self, source: str, text: str) -> int:
        """Record one bad file (``text``: the file and why it failed); the run's count of distinct files so far.
        A file met again (another worker, epoch or trial; the reason may read differently) is counted once."""
        self.names.setdefault(source, text)
        return len(self.names)

    def over(self) -> bool:
        """Whether the run met more bad files than its cap."""
        return len(self.names) > self.cap

    def report(self) -> list[str]:
        """Every bad file met, with its reason, in the order first met."""
        return list(self.names.values())


def start_ledger(cap: int):
    """A `BadImageLedger` actor for one run (no CPU of its own)."""
    import ray

    return ray.remote(BadImageLedger).options(num_cpus=0).remote(cap)
