"""Every private or internal API of Ray, W&B and fastai that the project uses, in one place.

"Private" here: an underscore name, a module under ``_private``/``_internal`` (or one Ray does
not document, such as ``ray.tune.execution``), an environment variable Ray reads only
internally, a file Ray writes for itself, a setting W&B marks internal (``x_``), or an
assumption about where Ray runs something. Each entry says why it is needed and what would
replace it; ``tests/unit/test_compat.py`` checks each against the pinned versions, and that
nothing outside this file uses such an API. A Ray, W&B or fastai upgrade means checking this
file, nothing else.

Imports are inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- Ray (the driver's end) ----------------------------------------------------------------


def quiet_ray_token_setup() -> None:
    """Ray 2.60 turns token authentication on for a local cluster it starts and says so at
    WARNING on stderr; that is the right default, not something to alarm users with.

    The logger is that of ``ray._private.authentication.authentication_token_setup``.
    Replacement: a public switch for that message if Ray adds one; quieting the whole ``ray``
    logger instead would also hide the warnings users need."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


def dashboard_url() -> str:
    """The dashboard of the Ray this process is connected to ("" if none): how the driver
    tells whether the Ray it is attached to is the local one it started.

    ``ray._private.worker.get_dashboard_url``. Replacement: keeping the ``RayContext`` that
    ``ray.init()`` returns (its ``dashboard_url``) where Ray is started; for a process that
    attached to a Ray started elsewhere nothing public says this."""
    import ray

    return ray._private.worker.get_dashboard_url() or ""


def autoscaler_node_groups() -> list[tuple[dict[str, Any], int]] | None:
    """(resources, max_count) per node group an autoscaler reported to the GCS (max_count -1:
    unbounded); None when no autoscaler reported or the API is not there. The most a cluster
    can grow to, so that a run is refused only when no number of nodes could fit it.

    ``ray._private.state.state.get_cluster_config()`` (an ``autoscaler_pb2.ClusterConfig``).
    Replacement: none public; without it the capacity check falls back to the nodes alive now
    and the cluster launcher's config (``launcher_config_path``)."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, other sources count
        return None
    if config is None:
        return None
    return [(dict(g.resources), g.max_count) for g in config.node_group_configs]


@contextmanager
def ray_daemons_in_own_process_group() -> Iterator[None]:
    """While a local Ray starts (``ray.init``), its daemons (GCS, raylet, dashboard, their
    helpers) start each in a process group of its own instead of the driver's.

    A signal to the driver's process group (``timeout`` forwards a SIGTERM to its command's
    group, a job wrapper's ``kill -- -PGID``) then reaches the driver alone, which stops the
    run in order: ask the workers to save the step in flight, stop Ray, write the record.
    In the driver's group, the GCS and raylet died with the same signal (they block SIGINT
    only), the grace period could not work and the driver's core worker aborted a minute
    later ("Failed to connect to GCS"). Ray's actors and workers have process groups of their
    own already; the daemons still die with the driver (Ray's kernel fate-sharing,
    ``PR_SET_PDEATHSIG``), which is independent of groups.

    ``ray._private.services.ConsolePopen``, the ``Popen`` class Ray starts every daemon with
    (``start_ray_process``), is swapped for the start. Replacement: a public option of
    ``ray.init`` for the daemons' process group, if Ray adds one."""
    import sys

    from ray._private import services

    original = services.ConsolePopen
    if sys.platform == "win32":  # no process groups to speak of; Ray's own flags stand
        yield
        return

    class OwnGroupPopen(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnGroupPopen  # type: ignore[misc]  # Ray's stubs: a class
    try:
        yield
    finally:
        services.ConsolePopen = original  # type: ignore[misc]


def launcher_config_path() -> Path:
    """The cluster launcher's config on a head node it started: ``ray up`` copies the
    cluster YAML to ``~/ray_bootstrap_config.yaml`` there for the autoscaler to read (file
    mounts in ``ray.autoscaler._private.commands``); a driver under ``ray job submit`` runs
    on the head, so it can read the node types and their ``max_workers`` too.

    Replacement: the user's cluster YAML, if the project is ever told where it is."""
    return Path.home() / "ray_bootstrap_config.yaml"


# Read by the raylet when it starts (Ray's system config ``worker_niceness``, set through a
# ``RAY_<name>`` variable; its name is ``ray._private.ray_constants.RAY_WORKER_NICENESS``):
# the niceness of the workers it starts, relative to its own. The benchmark sets it to 0, so
# that the Ray variants run at the same priority as the others. Replacement: none public.
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def listed_read_paths(dataset: Any) -> tuple[list[str], Any, list[str] | None] | None:
    """The paths a file-based Ray Dataset reads (``read_parquet(paths)``), its pyarrow
    filesystem and the file extensions it keeps, from its logical plan's ``ListFiles`` operator
    (``ray.data._internal.logical.operators.read_operator``): Ray 2.60 lists the files in a
    task when the dataset runs, so the public ``Dataset.input_files()`` is empty before (and
    after) that. None for a dataset not read from files. Used to fingerprint the data without
    reading it (``loop.provenance``). Replacement: ``input_files()``, once it lists them."""
    try:
        ops = list(dataset._logical_plan.dag.post_order_iter())
    except AttributeError:
        return None
    for op in ops:
        if type(op).__name__ == "ListFiles":
            return list(op.paths), op.filesystem, op.file_extensions
    return None


@dataclass(frozen=True)
class PlainParquetRead:
    """What a Ray Dataset that is nothing but ``read_parquet`` reads: its files (as Ray lists
    them), their pyarrow filesystem and the columns it keeps (None: every column of the files).
    """

    files: list[str]
    filesystem: Any
    columns: list[str] | None


def plain_parquet_read(dataset: Any) -> PlainParquetRead | None:
    """The files of a Ray Dataset whose logical plan is Ray 2.60's Parquet read and nothing
    else (``ListFiles -> ReadFiles``, then at most ``select_columns``/``columns=``, which are
    ``Project`` operators of plain column references); None for any other dataset: a transform,
    a filter, a limit, hive partition columns, a file shuffle, paths or row hashes added, a
    ``tensor_column_schema``, another source, Ray's older (V1) datasource, or a plan this
    function does not recognise. Lists the files with the datasource's own indexer and
    pruners, as the read would (``skip_paths`` and ``file_extensions`` included).

    Private: ``Dataset._logical_plan``, the operators of
    ``ray.data._internal.logical.operators`` (by class name) and their attributes, the V2
    datasource's ``ParquetScanner`` fields, ``FileIndexer.as_whole_file_indexer``/
    ``list_file_infos`` and ``listing_utils._build_pruners``. Used so that each worker reads
    its own rows with pyarrow (``workers/loop/parquet_shards.py``) instead of Ray Data's
    stream. Replacement: none public (``Dataset.input_files()`` is empty before the dataset
    runs, and nothing public says a dataset has no transforms)."""
    try:
        ops = list(dataset._logical_plan.dag.post_order_iter())
    except AttributeError:
        return None
    names = [type(op).__name__ for op in ops]
    if names[:2] != ["ListFiles", "ReadFiles"] or any(n != "Project" for n in names[2:]):
        return None
    listing, read = ops[0], ops[1]
    scanner: Any = getattr(read, "scanner", None)
    try:
        if (getattr(read, "datasource_name", None) != "ParquetV2" or read.block_udf is not None
                or any(getattr(listing, key) is not None for key in (
                    "partition_filter", "predicate", "projected_columns", "limit",
                    "partition_pruner"))
                or listing.shuffle_config_factory() is not None
                or type(scanner).__name__ != "ParquetScanner"
                or any(getattr(scanner, key) is not None for key in (
                    "shuffle", "partition_predicate", "batch_size", "columns", "predicate",
                    "limit", "ignore_prefixes"))
                or scanner.synthesized_columns or scanner.parquet_format_kwargs
                or (scanner.partitioning is not None and scanner.partitioning.field_names)):
            return None
        columns: list[str] | None = None
        for project in ops[2:]:
            if project._common_sub_exprs or any(type(e).__name__ != "ColumnExpr"
                                                for e in project.exprs):
                return None
            columns = [e.name for e in project.exprs]
        files = listed_parquet_files(listing)
    except AttributeError:  # another Ray's operators
        return None
    return PlainParquetRead(files, listing.filesystem, columns) if files else None


def listed_parquet_files(listing: Any) -> list[str]:
    """The files a ``ListFiles`` operator lists, in Ray's order (see ``plain_parquet_read``).
    """
    import pyarrow as pa
    from ray.data._internal.datasource_v2.common.listing_utils import _build_pruners

    indexer = listing.file_indexer.as_whole_file_indexer()
    infos = indexer.list_file_infos(
        pa.array(list(listing.paths), type=pa.string()), filesystem=listing.filesystem,
        pruners=_build_pruners(listing.file_extensions, None), preserve_order=True)
    return [info.path for info in infos]


# --- Ray Train ------------------------------------------------------------------------------

# Ray Train V2's internal settings, read from the environment (names and defaults in
# ``ray.train.v2._internal.constants``). Ray copies both from the process that calls
# ``fit()`` into its controller actor's runtime_env (that module's ``ENV_VARS_TO_PROPAGATE``;
# Tune copies the same set into each trial's), so setting them in the driver reaches the
# controller however the run is launched. Replacement: fields of ``RunConfig`` or
# ``FailureConfig``, if Ray makes them public.
#
# How often the controller polls the worker group (default 2.0 s): ``ray.train.report``
# returns only at a poll, so every epoch lasts at least one interval.
TRAIN_HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# How long the controller waits for a worker group to start (default 60 s) before retrying.
TRAIN_WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Whether the controller starts a preemption watcher with each worker group (default on): an
# actor process of its own that polls whether a node of the group is being drained. A local
# Ray that the driver starts is one node, its own, so there it would watch nothing.
TRAIN_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# How many actor processes Ray Data starts to read Parquet footers, at each execution that
# lists files (each epoch's pipelines; default 32, one at a time as CPUs allow): a pool to
# spread footer reads over a cluster's nodes. Read by ``FooterFileIndexer.__init__``.
DATA_PARQUET_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
DATA_PARQUET_FOOTER_READ_BY = ("ray.data._internal.datasource_v2.formats.parquet."
                               "footer_file_indexer:FooterFileIndexer.__init__")
# Where Ray reads each ("module:qualified name", checked by the test).
TRAIN_ENV_READ_BY = {
    TRAIN_HEALTH_CHECK_INTERVAL_ENV:
        "ray.train.v2._internal.execution.controller.controller:TrainController.__init__",
    TRAIN_WORKER_GROUP_START_TIMEOUT_ENV:
        "ray.train.v2._internal.execution.worker_group.worker_group:WorkerGroup.__init__",
    TRAIN_PREEMPTION_WATCHER_ENV:
        "ray.train.v2._internal.execution.controller.controller:TrainController.__init__",
}

# Files Ray Train writes into a run directory for itself
# (``ray.train.v2._internal.constants``): the checkpoint manager's state, which it reads back
# when a run of the same name starts again, and the marker with which it checks that the
# storage is writable (and shared between nodes).
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
TRAIN_STORAGE_MARKER_FILE = ".validate_storage_marker"


def registered_checkpoint_names(snapshot: dict[str, Any]) -> set[str]:
    """The checkpoint directories Ray registered, from the parsed ``TRAIN_SNAPSHOT_FILE``:
    the ones it keeps (``checkpoint_results``) and the latest (``latest_checkpoint_result``),
    each by its ``checkpoint_dir_name``. A directory Ray does not list there it will never
    delete (an upload that completed while its worker group was failing).

    The file's shape is the pydantic ``_CheckpointManagerState`` of
    ``ray.train.v2._internal.execution.checkpoint.checkpoint_manager``. Raises KeyError,
    TypeError or ValueError when the snapshot is not of that shape. Replacement:
    ``ray.train.Result.from_path(run_dir)`` (public; its ``best_checkpoints`` and
    ``checkpoint``), which reads the same file but refuses one written by another Ray version.
    """
    results = list(snapshot["checkpoint_results"])
    if snapshot.get("latest_checkpoint_result"):
        results.append(snapshot["latest_checkpoint_result"])
    return {r["checkpoint_dir_name"] for r in results}


def split_data_config(exact: frozenset[str] | set[str]) -> Any:
    """Ray Train's ``DataConfig`` for a run's Ray Dataset splits: the ``exact`` ones (validation
    and test) split with ``streaming_split(equal=False)``, each row to exactly one worker;
    the others (the training split) with Ray's own ``equal=True``, in the dataset's order
    (``preserve_order``), so that an epoch's rows per rank are the same on a restart.

    ``DataConfig.configure`` is a DeveloperAPI meant to be overridden ("this class can be
    subclassed"); its body here follows Ray 2.60's, including the private
    ``_resolve_execution_options`` (the per-dataset options given to the constructor).
    Replacement: an ``equal`` setting per dataset in ``DataConfig``, if Ray adds one."""
    from ray.train import DataConfig

    class ExactSplits(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            even = {name: ds for name, ds in datasets.items() if name not in exact}
            output = (super().configure(even, world_size, worker_handles, worker_node_ids,
                                        **kwargs) if even else [{} for _ in range(world_size)])
            for name, ds in datasets.items():
                if name not in exact:
                    continue
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for rank, split in enumerate(ds.streaming_split(
                        world_size, equal=False, locality_hints=worker_node_ids)):
                    output[rank][name] = split
            return output

    with warnings.catch_warnings():  # Ray's own default carries a deprecated field over
        warnings.simplefilter("ignore")
        ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    return ExactSplits(execution_options={"train": ordered})


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO on each worker; the driver prints one line per
    epoch instead. That module's logger is named after its file path, not its module name,
    so it can only be reached through the module
    (``ray.train.v2._internal.execution.context.logger``).

    Replacement: a ``LoggingConfig`` that reached the workers' context logger (the one the
    trainer sets covers Ray Train's own structured logs only)."""
    from ray.train.v2._internal.execution import context as train_context

    train_context.logger.setLevel(logging.WARNING)


@dataclass(frozen=True)
class TrainRunStorage:
    """The run directory of the current Ray Train run, as Ray's ``StorageContext`` (``context``)
    has it: a pyarrow filesystem and paths on it without a URI scheme."""

    context: Any

    @property
    def filesystem(self) -> Any:
        return self.context.storage_filesystem

    @property
    def run_path(self) -> str:
        return self.context.experiment_fs_path

    def checkpoint_path(self, name: str) -> str:
        return self.context.build_checkpoint_path_from_name(name)


def train_run_storage() -> TrainRunStorage:
    """On a Ray Train worker: where the run's checkpoints go, so that a checkpoint is written
    straight into the run directory (on Ray's upload thread) instead of into a local copy.

    ``ray.train.get_context().get_storage()`` is a DeveloperAPI whose ``StorageContext``
    (``ray.train.v2._internal.execution.storage``) "may change without notice between minor
    versions". Replacement: the run directory from the run's own config (``storage_path`` and
    ``name``) and ``pyarrow.fs.FileSystem.from_uri``, the way Ray derives it."""
    return TrainRunStorage(train_fn_utils().get_context().get_storage())


def train_fn_utils() -> Any:
    """The Ray Train function utilities of this process (``ray.train.v2._internal.execution.
    train_fn_utils``): what ``ray.train.report``, ``get_checkpoint`` and ``get_context`` call.
    The workers call them through here because those public functions refuse to run in a
    process that is a Tune trial (a ``DeprecationWarning``, ray#49454), and a one-worker trial
    trains in its Tune trial's own process (``orchestrator/training/one_process``), with its
    own utilities installed (``install_train_fn_utils``), as Ray's local mode installs its own.
    Replacement: the public functions, if Ray lets a Tune trial install a Train session."""
    from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

    return get_train_fn_utils()


def install_train_fn_utils(utils: Any) -> None:
    """Make ``utils`` (an instance of ``train_fn_utils_base()``) this process's Ray Train
    function utilities, as Ray's ``LocalController`` does for its local mode."""
    from ray.train.v2._internal.execution.train_fn_utils import set_train_fn_utils

    set_train_fn_utils(utils)


def train_fn_utils_base() -> type:
    """The abstract ``TrainFnUtils`` (Ray Train's seam between its public functions and a
    process's run: "this class can be patched if new user API behaviors is wanted")."""
    from ray.train.v2._internal.execution.train_fn_utils import TrainFnUtils

    return TrainFnUtils


def one_process_train_context(name: str, storage_context: Any) -> Any:
    """Rank 0 of 1, as Ray's local mode describes it (``LocalTrainContext``), whose
    ``get_storage`` is the run's ``storage_context`` (local mode has none)."""
    from ray.train.v2.api.context import LocalTrainContext

    class _Context(LocalTrainContext):
        def get_storage(self) -> Any:
            return storage_context

    return _Context(experiment_name=name)


def train_storage_context(storage_path: str, name: str) -> Any:
    """Ray Train's ``StorageContext`` of the run ``name`` under ``storage_path`` (a local path
    or URI), the way the trainer builds it for its controller and workers."""
    from ray.train.v2._internal.execution.storage import StorageContext

    return StorageContext(storage_path=storage_path, experiment_dir_name=name)


def one_process_checkpoint_manager(checkpoint_config: Any, storage_context: Any) -> Any:
    """Ray Train's own ``CheckpointManager`` (the controller's), outside a controller: it
    restores the run's state from its snapshot in storage, keeps and deletes checkpoints by
    the ``CheckpointConfig`` and writes the snapshot after each, exactly as in a Ray Train run.
    Its ``_notify`` wakes asyncio waiters of the controller's event loop; there is none here.
    Register a checkpoint with ``register_checkpoint(manager, checkpoint, metrics)``."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager

    class _Manager(CheckpointManager):
        def _notify(self) -> None:
            pass

    logging.getLogger(CheckpointManager.__module__).setLevel(logging.WARNING)
    return _Manager(checkpoint_config=checkpoint_config, storage_context=storage_context)


def register_checkpoint(manager: Any, checkpoint: Any, metrics: dict[str, Any]) -> None:
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    manager.register_checkpoint(_TrainingReport(checkpoint=checkpoint, metrics=metrics,
                                                validation=False))


def latest_checkpoint(manager: Any) -> Any:
    """The checkpoint a run continues from (Ray Train hands it to its workers at start)."""
    latest = manager.latest_checkpoint_result
    return latest.checkpoint if latest is not None else None


def train_controller_handle() -> Any:
    """In a ``ray.train.UserCallback`` hook: the actor handle of the Ray Train controller that
    runs it, so that the driver can stop a run (``kill_train_controller``). Ray documents
    that user callbacks run in the controller process; that the process is an actor (the
    ``TrainController`` that ``DataParallelTrainer`` starts with ``ray.remote``) is Ray
    Train's implementation. Replacement: a public way to stop a fit from another thread."""
    import ray

    return ray.get_runtime_context().current_actor


def kill_train_controller(handle: Any) -> None:
    """Stop a Ray Train run now through its controller's actor handle (from
    ``train_controller_handle``); the controller's workers, actors it owns, go with it, and
    ``fit()`` returns in the driver. ``ray.kill`` is public, but killing Ray Train's internal
    controller actor bypasses Ray Train (its own Ctrl-C handler calls the controller's
    internal ``abort``). Raises what ``ray.kill`` raises (the actor is already gone).
    Replacement: a public way to stop a fit from another thread."""
    import ray

    ray.kill(handle, no_restart=True)


def train_worker_callback_bases() -> tuple[type, ...]:
    """Ray Train's worker-side callback interfaces (``WorkerCallback``: after the train
    context is set up; ``TrainContextCallback``: ``on_report`` around each
    ``ray.train.report``), from ``ray.train.v2._internal.execution.callback``. The benchmark
    uses them to time each report on rank 0; public ``UserCallback`` hooks run only in the
    controller. Replacement: none public in 2.60."""
    from ray.train.v2._internal.execution.callback import TrainContextCallback, WorkerCallback

    return WorkerCallback, TrainContextCallback


def internal_train_context() -> Any:
    """The worker's internal train context (``ray.train.v2._internal.execution.context``),
    the one set when ``WorkerCallback.after_init_train_context`` runs (its
    ``get_world_rank()``). Replacement: ``ray.train.get_context()`` once the train function
    runs."""
    from ray.train.v2._internal.execution.context import get_train_context

    return get_train_context()


def torch_trainer_class(ray_datasets: bool) -> type:
    """``TorchTrainer``, or for a run without Ray Datasets, a ``TorchTrainer`` whose controller
    does not run Ray Train's ``DatasetsCallback``. That callback starts a ``DatasetManager``
    actor at every worker-group start (each restart too), a process of its own (about
    1.8 CPU-seconds on 2 cores), even when the trainer has no datasets, and hands the workers
    a shard provider they never ask; without it the workers' train context has none, which
    ``ray.train.get_dataset_shard`` alone would need. ``_create_default_callbacks`` is
    ``DataParallelTrainer``'s private method. Replacement: none in 2.60."""
    from ray.train.torch import TorchTrainer

    if ray_datasets:
        return TorchTrainer
    return _trainer_without_datasets()


@functools.cache
def _trainer_without_datasets() -> type:
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class TorchTrainerWithoutDatasets(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [cb for cb in super()._create_default_callbacks()  # type: ignore[misc]
                    if not isinstance(cb, DatasetsCallback)]

    return TorchTrainerWithoutDatasets


# --- Ray Tune -------------------------------------------------------------------------------


def keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SECURITY_TOKEN and
    AWS_SESSION_TOKEN from the driver's environment into every trial's runtime_env, and Ray's
    runtime-env agent logs runtime envs in full (``runtime_env_agent.log`` in the session's
    logs): the secrets end up on disk. Trials get credentials the way Ray Train's workers do,
    which Ray does not copy: inherited from the driver on a local Ray, from the node's own
    environment (an instance profile) on a cluster. The set is read when a trial starts.

    ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`` (an undocumented module).
    Replacement: a Tune option not to copy them, if Ray adds one."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {
        name for name in class_cache.ENV_VARS_TO_PROPAGATE if not name.startswith("AWS_")}


def trial_error(trial: Any) -> BaseException | None:
    """The exception a failed Tune trial raised (Ray's ``RayTaskError`` around it), for a
    ``Callback.on_trial_error``, which is given the trial but not its error; None when Tune
    kept none.

    ``ray.tune.experiment.Trial.pickled_error_file`` (a DeveloperAPI class): the file on the
    driver that Tune pickles the error into before it calls the callbacks (its public
    ``get_pickled_error`` reads the copy in the storage path, synced only later).
    Replacement: the exception passed to ``on_trial_error``, if Tune adds it."""
    import pickle

    try:
        path = trial.pickled_error_file
        if not path or not Path(path).exists():
            return None
        with open(path, "rb") as f:
            return pickle.load(f)  # Tune's own file of this driver's trial
    except Exception:  # noqa: BLE001 - a private API: without it, other sources count
        return None


IGNORE_UNHANDLED_ERRORS_ENV = "RAY_IGNORE_UNHANDLED_ERRORS"


def quiet_unhandled_task_errors() -> None:
    """Once a search stops on a trial's user error, the trials Tune stopped at the same time
    may fail with the same error; nobody reads their results, and Ray logs each as an
    "Unhandled error" with its traceback when its reference is dropped (at any time, up to
    Ray's shutdown), after the one line that already said it. Ray reads this variable each
    time (``ray._private.worker.Worker.raise_errors``); set for the rest of the process.
    Replacement: a way to drop a Tune trial's result unread, if Ray adds one."""
    import os

    os.environ[IGNORE_UNHANDLED_ERRORS_ENV] = "1"


TUNE_ERROR_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")


@contextmanager
def tune_error_logs_filtered(drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """While a search runs, Tune's own ERROR log lines that ``drop`` says are told otherwise
    (a trial's failure with its traceback, the list of trials that did not complete: a user's
    mistake is one line of the project's instead).

    The loggers of ``ray.tune.execution.tune_controller`` (undocumented) and ``ray.tune.tune``.
    Replacement: a Tune option not to print trial errors (``TuneController`` has
    ``_print_trial_errors``, not reachable through ``Tuner``)."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not drop(record)

    loggers, dropper = [logging.getLogger(name) for name in TUNE_ERROR_LOGGERS], _Drop()
    for logger in loggers:
        logger.addFilter(dropper)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(dropper)


TUNE_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


@contextmanager
def tune_output_silenced() -> Iterator[None]:
    """While a search starts, Tune's own terminal output off: with ``verbose=0``, Ray 2.60's
    new output engine (``RAY_AIR_NEW_OUTPUT``, on by default) still prints a
    "Configuration for experiment" box, "View detailed results here" and a TensorBoard
    command for Ray's session directory (``TuneTerminalReporter.experiment_started``); the
    legacy engine at ``verbose=0`` prints nothing. The search prints its own lines. Tune
    reads the variable when ``Tuner.fit`` starts; the previous value comes back after.
    Replacement: a ``verbose=0`` that silences the new engine's start too."""
    import os

    before = os.environ.get(TUNE_NEW_OUTPUT_ENV)
    os.environ[TUNE_NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TUNE_NEW_OUTPUT_ENV, None)
        else:
            os.environ[TUNE_NEW_OUTPUT_ENV] = before


def wait_for_tune_to_take_the_last_report(timeout_s: float = 60.0) -> None:
    """Called by a Tune trial function after its ``TorchTrainer.fit`` returns, before it
    returns itself. ``TuneReportCallback`` puts each report on a Ray queue of one, which the
    trial actor's main thread moves into the session's result queue (also of one). When the
    function returns, Tune's wrapper reports a last "done" result into that result queue from
    the function's thread. If the run's last report is still on its way then, the main thread
    takes it and blocks forever putting it into the full result queue: the trial never ends
    and the search hangs (Ray 2.60, ``function_trainable.py`` line 255 against
    ``session._get_result_from_queues``; seen here twice in three 8-trial searches). Waiting
    until both queues have stayed empty for a moment closes the window.

    ``ray.train._internal.session.get_session()``, its ``_inter_actor_queue`` and
    ``result_queue``. Replacement: a fix in Ray, or a public "report consumed" signal."""
    import time

    from ray.train._internal.session import get_session

    session = get_session()
    if session is None:
        return
    deadline, quiet = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and quiet < 3:
        inter = session._inter_actor_queue
        idle = (inter is None or inter.empty()) and session.result_queue.empty()
        quiet = quiet + 1 if idle else 0
        time.sleep(0.1)


@dataclass
class PBTHooks:
    """What ``pbt_scheduler`` asks the project (``orchestrator.search.pbt``), in public terms:

    - ``checkpoint_of(result)``: the checkpoint a compared result came with (None: none);
    - ``exploit(trial, donor, result, checkpoint)``: prepare the trial to continue from the
      donor's ``checkpoint`` (of ``result``); returns the ``ray.tune.Checkpoint`` Tune restores
      the trial from;
    - ``new_config(trial, explored)``: the trial's config after the exploit, from Tune's
      ``explored`` (the donor's config, perturbed);
    - ``after_exploit(trial, donor, trial_score, donor_score)``: the exploit was made;
    - ``seeded()``: a context in which Tune draws from the ``random`` module;
    - ``last_epoch``: results from this epoch on are the run's end, never compared;
    - ``max_running``: trials running at once (Tune's ``max_concurrent_trials`` cannot be
      used: its variant generator counts a paused trial as live and would never create the
      trials a synchronous PBT waits for)."""

    checkpoint_of: Any
    exploit: Any
    new_config: Any
    after_exploit: Any
    seeded: Any
    last_epoch: int
    max_running: int
    interval: int = 1  # only results at multiples of it (the ends of legs) are compared


def pbt_scheduler(hooks: PBTHooks, **options: Any) -> Any:
    """Ray Tune's ``PopulationBasedTraining`` (``options``: its own arguments) for trials whose
    checkpoints are Ray Train's, not Tune's.

    Tune's PBT copies a Tune checkpoint of the donor (``_checkpoint_or_exploit`` asks the
    trial to save one, ``_exploit`` sets it as the exploiting trial's restore point) and gives
    the exploiting trial the donor's whole config (``_get_new_config``). A trial that runs a
    Ray Train trainer reports its checkpoints to Ray Train and only their path to Tune, and
    the project's trials keep their own id and directory. So three private methods are
    overridden, with the per-trial state ``_trial_state`` (``last_result``,
    ``last_checkpoint``, ``last_score``) and ``_metric`` / ``_metric_op``.
    Replacement: a public PBT hook for where a trial's state comes from, if Tune adds one."""
    import random

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class ProjectPBT(PopulationBasedTraining):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.starting: set[Any] = set()  # chosen to run, not running yet

        def choose_trial_to_run(self, tune_controller: Any) -> Any:
            # Tune's choice (paused or pending trials behind the next comparison, the least
            # trained first), held back while ``max_running`` trials run or start.
            trials = tune_controller.get_trials()
            self.starting = {t for t in self.starting if t.status == Trial.PENDING}
            running = sum(t.status == Trial.RUNNING for t in trials) + len(self.starting)
            if running >= hooks.max_running:
                return None
            candidates = sorted(
                (t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)
                 and t not in self.starting
                 and self._trial_state[t].last_train_time < self._next_perturbation_sync),
                key=lambda t: self._trial_state[t].last_train_time)
            if not candidates:
                return None
            self.starting.add(candidates[0])
            return candidates[0]

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            # A resume checkpoint a signal asked for is no evaluation; the last epoch is the
            # run's end, where nothing is compared any more; only the end of a leg is.
            epoch = result.get("epoch", 0)
            if (self._metric not in result or epoch >= hooks.last_epoch
                    or epoch % hooks.interval):
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def _checkpoint_or_exploit(self, trial: Any, tune_controller: Any,
                                   upper_quantile: list, lower_quantile: list) -> None:
            state = self._trial_state[trial]
            state.last_checkpoint = (hooks.checkpoint_of(state.last_result or {})
                                     if trial in upper_quantile else None)
            if trial not in lower_quantile or not upper_quantile:
                return
            with hooks.seeded():
                donor = random.choice(upper_quantile)
            donor_state = self._trial_state[donor]
            if donor_state.last_checkpoint is None:
                return  # its epoch came without a checkpoint: nothing to continue from
            path = donor_state.last_checkpoint
            donor_state.last_checkpoint = hooks.exploit(trial, donor, donor_state.last_result,
                                                        path)
            try:
                with hooks.seeded():
                    self._exploit(tune_controller, trial, donor)
            finally:
                donor_state.last_checkpoint = path
            # Set by Tune before any result: neither is None here.
            hooks.after_exploit(trial, donor,
                                self._trial_state[trial].last_score  # type: ignore[operator]
                                * self._metric_op,
                                donor_state.last_score * self._metric_op)  # type: ignore[operator]

        def _get_new_config(self, trial: Any, trial_to_clone: Any) -> tuple[dict, dict]:
            explored, operations = super()._get_new_config(trial, trial_to_clone)
            return hooks.new_config(trial, explored), operations

    return ProjectPBT(**options)


# --- Weights & Biases -----------------------------------------------------------------------


def wandb_settings(**settings: Any) -> Any:
    """``wandb.Settings(**settings)`` without W&B's system metrics: W&B would sample the
    machine and process that call ``wandb.init`` (CPU, memory, GPU, disk, network) every few
    seconds. That is the driver, which trains nothing (the training runs in Ray's workers, on
    other nodes of a cluster), so those charts would describe the wrong processes, at the cost
    of a sampler beside the training.

    ``x_disable_stats`` is one of the settings W&B calls internal ("not ... part of the
    public API as they may change or be removed"). Replacement: a public setting for it, if
    W&B adds one; without it, W&B charts the driver's machine."""
    import wandb

    return wandb.Settings(**settings, x_disable_stats=True)


# --- fastai ---------------------------------------------------------------------------------


def attach_fastai_fake_loader(dl: Any, like: Any) -> None:
    """Give the fastai DataLoader ``dl`` its own ``_FakeLoader`` (the torch DataLoader a fastai
    DataLoader iterates through, its ``fake_l``), with the settings of ``like``'s (another
    fastai DataLoader): fastai's public ``DistributedDL`` cannot be used under gloo on CPU
    (see engines.fastai.data). ``fastai.data.load._FakeLoader``. Replacement:
    ``DistributedDL``, once it runs without CUDA and without the ``accelerate`` package."""
    from fastai.data.load import _FakeLoader

    fake = like.fake_l
    dl.fake_l = _FakeLoader(dl, fake.pin_memory, fake.num_workers, fake.timeout,
                            persistent_workers=fake.persistent_workers,
                            pin_memory_device=fake.pin_memory_device)


@functools.cache
def fastai_save_model_callback() -> type:
    """fastai's ``SaveModelCallback`` with the method it saves through under a public name:
    subclasses override ``save_model(name)`` (and set ``last_saved_path``, as fastai's does)
    to change how a model is written, keeping every decision of when (``after_epoch``,
    ``after_fit``, ``every_epoch``, ``at_end``) fastai's own.

    fastai 2.8.12 calls its private ``SaveModelCallback._save(name)`` for each save.
    Replacement: a public saving hook in fastai; else reimplementing those decisions, which
    would drift from fastai's."""
    from fastai.callback.tracker import SaveModelCallback

    class SaveModelHook(SaveModelCallback):
        def _save(self, name: str) -> None:
            self.save_model(name)

        def save_model(self, name: str) -> None:
            SaveModelCallback._save(self, name)

    return SaveModelHook


# --- torchmetrics ---------------------------------------------------------------------------


def torchmetric_reductions(metric: Any) -> dict[str, str]:
    """How torchmetrics combines each state of ``metric`` across ranks: ``sum``, ``cat``,
    ``mean``, ``max``, ``min``, ``none`` (stacked) or ``custom``. torchmetrics keeps them in
    the private ``Metric._reductions`` (state name -> its ``dim_zero_*`` function); no public
    API names them. Replacement: a public accessor of the reductions, if torchmetrics adds
    one; without it, every torchmetrics metric would have to be trusted to sync exactly."""
    from torchmetrics.utilities import data

    known = {data.dim_zero_sum: "sum", data.dim_zero_cat: "cat", data.dim_zero_mean: "mean",
             data.dim_zero_max: "max", data.dim_zero_min: "min"}
    return {name: "none" if fn is None else known.get(fn, "custom")
            for name, fn in metric._reductions.items()}
