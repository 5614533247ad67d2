"""The driver's side of Ray Train for `pipeline.supertrain`: where the workers go, how file-backed data reaches
them (Ray Data pipelines, decoded on the CPUs the workers leave free), and the `TorchTrainer` run itself."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from supervit.data import Splits

if TYPE_CHECKING:
    from .options import SupertrainOptions
    from .worker import Streamed

__all__ = ["streamed_data", "check_bad_images", "place_workers", "fit"]


def streamed_data(opts: SupertrainOptions, splits: Splits) -> tuple[Streamed | None, dict | None]:
    """For file-backed data, the Ray Data pipelines of the three splits (decoded where CPUs are free) and what
    the workers need besides; (None, None) for in-memory data, which the workers load themselves."""
    from supervit.data import FileImages

    from ..common.data import eval_dataset, train_dataset
    from ..common.ledger import start_ledger
    from .worker import Streamed

    if not isinstance(splits.train, FileImages):
        return None, None
    remote = {"num_cpus": opts.decode_cpus}
    repeats = 3 if opts.repeated_aug else 1
    datasets = {
        "train": train_dataset(splits.train, opts.augment(), repeated_aug=repeats, remote_args=remote),
        "search": eval_dataset(splits.search, remote_args=remote),
        "test": eval_dataset(splits.test, remote_args=remote),
    }
    ledger = start_ledger(opts.max_bad_images)
    return Streamed(splits.num_classes, len(splits.train), ledger, opts.max_bad_images), datasets


def check_bad_images(streamed: Streamed | None) -> None:
    """Raise the run's one-line `DataError` if its workers met more undecodable images than allowed."""
    from ..common.batches import raise_if_over

    if streamed is not None:
        raise_if_over(streamed.ledger, streamed.max_bad_images)


def place_workers(opts: SupertrainOptions, streamed: bool) -> tuple[SupertrainOptions, bool]:
    """The options with CPUs per worker decided, and whether the workers use GPUs (by default when the cluster
    has them). By default the workers share the cluster's CPUs, or half of them when images are decoded by Ray
    Data, which needs the other half."""
    import ray

    resources = ray.cluster_resources()
    use_gpu = (opts.gpus_per_worker or 0) > 0 if opts.gpus_per_worker is not None else resources.get("GPU", 0) > 0
    share = int(resources.get("CPU", 1)) // (2 * opts.workers if streamed else opts.workers)
    return dataclasses.replace(opts, cpus_per_worker=opts.cpus_per_worker or max(1, share)), use_gpu


def fit(
    opts: SupertrainOptions,
    *,
    name: str,
    storage: str,
    tracking_uri: str,
    run_id: str,
    use_gpu: bool,
    streamed: Streamed | None,
    datasets: dict | None,
):
    """Ray Train's run of the worker loop (on streamed datasets, when given), with the epoch logger and the
    console; its `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..common.console import Console
    from ..common.data import data_config
    from .worker import make_epoch_logger, train_loop_per_worker

    per_worker = {"CPU": opts.cpus_per_worker} | ({"GPU": opts.gpus_per_worker or 1} if use_gpu else {})
    with Console() as console:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"opts": opts, "console": console, "streamed": streamed},
            scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
            datasets=datasets,
            dataset_config=data_config() if datasets else None,
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=opts.keep_checkpoints),
                failure_config=FailureConfig(max_failures=opts.max_failures),
                callbacks=[make_epoch_logger(tracking_uri, run_id, opts.epochs, console)],
            ),
        )
        return trainer.fit()
