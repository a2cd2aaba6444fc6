"""The register of private APIs (``workers.compat``), checked against the pinned Ray, W&B and
fastai: each private name still exists with the signature, attributes or file shape compat
relies on; and nothing outside compat uses such an API. No Ray is started here.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import logging
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from workers import compat

REPO = Path(__file__).resolve().parents[2]
COMPAT_FILE = REPO / "workers" / "compat.py"
LIBRARIES = ("ray", "wandb", "fastai", "fastcore")


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_importing_compat_imports_none_of_the_libraries() -> None:
    code = ("import sys, workers.compat; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ray', 'wandb', 'fastai', 'fastcore', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "[]"


def test_every_name_in_the_register_is_checked_here() -> None:
    own = [name for name, value in vars(compat).items() if not name.startswith("_")
           and getattr(value, "__module__", compat.__name__) == compat.__name__
           and (callable(value) or name.isupper())]
    text = Path(__file__).read_text()
    assert [name for name in own if f"compat.{name}" not in text] == []


# --- Ray (the driver's end) ----------------------------------------------------------------


def test_token_setup_logger_is_the_one_compat_quiets() -> None:
    module = importlib.import_module("ray._private.authentication.authentication_token_setup")
    before = module.logger.level
    try:
        compat.quiet_ray_token_setup()
        assert module.logger.getEffectiveLevel() == logging.ERROR
    finally:
        module.logger.setLevel(before)


def test_ray_starts_its_daemons_with_the_popen_class_compat_swaps() -> None:
    from ray._private import services

    original = services.ConsolePopen
    assert issubclass(original, subprocess.Popen)
    assert "ConsolePopen(" in inspect.getsource(services.start_ray_process)
    with compat.ray_daemons_in_own_process_group():
        daemon = services.ConsolePopen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert services.ConsolePopen is original
        # A session (so a process group) of its own: a signal to this process's group
        # does not reach it.
        assert os.getsid(daemon.pid) == daemon.pid != os.getpgrp()
    finally:
        daemon.kill()
        daemon.wait()


def test_dashboard_url_source() -> None:
    import ray

    assert params(ray._private.worker.get_dashboard_url) == []
    assert callable(compat.dashboard_url)


def test_autoscaler_node_groups_read_the_gcs_cluster_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray.core.generated import autoscaler_pb2

    state = ray._private.state.state
    assert params(state.get_cluster_config) == []
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.resources["CPU"] = 4
    group.max_count = -1
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    assert compat.autoscaler_node_groups() == [({"CPU": 4}, -1)]
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    assert compat.autoscaler_node_groups() is None


def test_launcher_config_is_where_ray_up_puts_it() -> None:
    commands = importlib.import_module("ray.autoscaler._private.commands")
    name = compat.launcher_config_path().relative_to(Path.home()).as_posix()
    assert f'"~/{name}": remote_config_file.name' in inspect.getsource(commands)


def test_worker_niceness_variable() -> None:
    constants = importlib.import_module("ray._private.ray_constants")
    assert constants.RAY_WORKER_NICENESS == compat.WORKER_NICENESS_ENV


def test_a_file_reads_paths_are_on_its_list_files_operator() -> None:
    """What ``compat.listed_read_paths`` reads, without starting Ray (a ``read_parquet``
    would): the operator's class name and its fields; and a dataset without it gives None."""
    import dataclasses

    module = importlib.import_module("ray.data._internal.logical.operators.read_operator")
    fields = {f.name for f in dataclasses.fields(module.ListFiles)}
    assert {"paths", "filesystem", "file_extensions"} <= fields
    source = inspect.getsource(importlib.import_module("ray.data.dataset").Dataset)
    assert "self._logical_plan" in source
    assert compat.listed_read_paths(object()) is None



def test_a_plain_parquet_read_is_recognised_by_the_fields_compat_reads() -> None:
    """What ``compat.plain_parquet_read`` (and ``compat.listed_parquet_files``) read of a
    plan, without starting Ray: the operators' and the scanner's fields, the indexer's
    listing, the pruners; a ``compat.PlainParquetRead`` of files; anything else gives None."""
    import dataclasses

    operators = importlib.import_module("ray.data._internal.logical.operators.read_operator")
    listing = {f.name for f in dataclasses.fields(operators.ListFiles)}
    assert {"paths", "filesystem", "file_indexer", "file_extensions", "partition_filter",
            "predicate", "projected_columns", "limit", "partition_pruner",
            "shuffle_config_factory"} <= listing
    assert {"datasource_name", "scanner", "block_udf"} <= {
        f.name for f in dataclasses.fields(operators.ReadFiles)}
    scanner = importlib.import_module(
        "ray.data._internal.datasource_v2.formats.parquet.parquet_scanner").ParquetScanner
    assert {"shuffle", "partitioning", "partition_predicate", "batch_size", "columns",
            "predicate", "limit", "ignore_prefixes", "synthesized_columns",
            "parquet_format_kwargs"} <= {f.name for f in dataclasses.fields(scanner)}
    project = importlib.import_module("ray.data._internal.logical.operators.map_operator")
    assert "_common_sub_exprs" in inspect.getsource(project.Project)
    assert isinstance(importlib.import_module("ray.data.expressions").ColumnExpr.name, property)
    indexer = importlib.import_module("ray.data._internal.datasource_v2.common."
                                      "non_sampling_file_indexer").NonSamplingFileIndexer
    assert hasattr(indexer, "as_whole_file_indexer")
    assert params(indexer.list_file_infos)[:5] == ["self", "paths", "filesystem", "pruners",
                                                   "preserve_order"]
    listing_utils = importlib.import_module(
        "ray.data._internal.datasource_v2.common.listing_utils")
    assert params(listing_utils._build_pruners)[:2] == ["file_extensions", "partition_filter"]
    assert compat.plain_parquet_read(object()) is None
    assert compat.PlainParquetRead(["a.parquet"], None, None).columns is None


# --- Ray Train ------------------------------------------------------------------------------


def test_train_env_variables_are_read_where_compat_says() -> None:
    constants = importlib.import_module("ray.train.v2._internal.constants")
    defaults = {compat.TRAIN_HEALTH_CHECK_INTERVAL_ENV: 2.0,
                compat.TRAIN_WORKER_GROUP_START_TIMEOUT_ENV: 60.0,
                compat.TRAIN_PREEMPTION_WATCHER_ENV: True}
    assert set(compat.TRAIN_ENV_READ_BY) == set(defaults)
    for env, where in compat.TRAIN_ENV_READ_BY.items():
        names = [k for k, v in vars(constants).items() if v == env and k.endswith("_ENV_VAR")]
        assert len(names) == 1, env
        default = getattr(constants, "DEFAULT_" + names[0].removesuffix("_ENV_VAR"))
        assert default == defaults[env]
        module, qualname = where.split(":")
        reader = importlib.import_module(module)
        for part in qualname.split("."):
            reader = getattr(reader, part)
        assert re.search(rf"(os\.getenv|os\.environ\.get|env_bool)\(\s*{names[0]}\b",
                         inspect.getsource(reader)), (env, where)
        # Copied from the driver into the controller's runtime_env, and into Tune trials'.
        assert env in constants.ENV_VARS_TO_PROPAGATE
        assert env in importlib.import_module("ray.tune.execution.class_cache") \
            .ENV_VARS_TO_PROPAGATE


def test_train_files_are_named_as_ray_names_them(tmp_path: Path) -> None:
    constants = importlib.import_module("ray.train.v2._internal.constants")
    storage = importlib.import_module("ray.train.v2._internal.execution.storage")
    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == compat.TRAIN_SNAPSHOT_FILE
    assert constants.VALIDATE_STORAGE_MARKER_FILENAME == compat.TRAIN_STORAGE_MARKER_FILE
    context = storage.StorageContext(str(tmp_path), "run")
    assert (tmp_path / "run" / compat.TRAIN_STORAGE_MARKER_FILE).is_file()
    assert context.checkpoint_manager_snapshot_path == \
        (tmp_path / "run" / compat.TRAIN_SNAPSHOT_FILE).as_posix()


def test_registered_checkpoints_from_the_snapshot_ray_writes(tmp_path: Path) -> None:
    """Ray's own checkpoint manager registers three checkpoints and keeps the best and the
    latest: the names read from the file it wrote are exactly the directories it kept."""
    import json

    from ray.train import Checkpoint, CheckpointConfig

    manager_module = importlib.import_module(
        "ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    storage = importlib.import_module("ray.train.v2._internal.execution.storage")
    report = importlib.import_module("ray.train.v2._internal.execution.training_report")
    assert params(manager_module.CheckpointManager.__init__) == [
        "self", "checkpoint_config", "storage_context"]
    context = storage.StorageContext(str(tmp_path), "run")
    manager = manager_module.CheckpointManager(
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="loss",
                                           checkpoint_score_order="min"),
        storage_context=context)

    async def register() -> None:  # its waiters are notified on an event loop
        for name, loss in (("checkpoint_a", 1.0), ("checkpoint_b", 2.0), ("checkpoint_c", 3.0)):
            path = context.build_checkpoint_path_from_name(name)
            os.makedirs(path)
            manager.register_checkpoint(report._TrainingReport(
                checkpoint=Checkpoint(path), metrics={"loss": loss}, validation=False))

    asyncio.run(register())
    run = tmp_path / "run"
    snapshot = json.loads((run / compat.TRAIN_SNAPSHOT_FILE).read_text())
    kept = {p.name for p in run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir()}
    assert kept == {"checkpoint_a", "checkpoint_c"}  # the best, and the latest
    assert compat.registered_checkpoint_names(snapshot) == kept
    assert compat.registered_checkpoint_names({**snapshot, "checkpoint_results": []}) == \
        {"checkpoint_c"}

    # What the run's summary does with it: a directory Ray never registered goes, no other.
    from orchestrator.results.summary import remove_unregistered_checkpoints

    (run / "checkpoint_unregistered").mkdir()
    assert remove_unregistered_checkpoints(str(run)) == ["checkpoint_unregistered"]
    assert {p.name for p in run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir()} \
        == kept


def test_a_one_process_run_reaches_ray_trains_functions_and_its_checkpoint_manager(
        tmp_path: Path) -> None:
    """A one-worker trial in its Tune trial's own process (orchestrator/training/one_process):
    the utilities installed are the ones the workers reach (``train_fn_utils``), its context is
    rank 0 of 1 with the run's storage, and Ray Train's own checkpoint manager keeps, deletes
    and snapshots outside any event loop; a second one, as after a restart, continues from the
    latest checkpoint registered."""
    from ray.train import Checkpoint, CheckpointConfig

    base = compat.train_fn_utils_base()
    assert {"report", "get_checkpoint", "get_context", "is_distributed"} <= \
        base.__abstractmethods__
    context = compat.train_storage_context(str(tmp_path), "run")
    train_context = compat.one_process_train_context("run", context)
    assert (train_context.get_world_rank(), train_context.get_world_size()) == (0, 1)
    assert train_context.get_storage() is context

    class Utils(base):  # type: ignore[misc, valid-type]
        def report(self, *args: Any, **kwargs: Any) -> None:
            pass

        def get_checkpoint(self) -> None:
            return None

        def get_all_reported_checkpoints(self, *args: Any, **kwargs: Any) -> list[Any]:
            return []

        def get_dataset_shard(self, dataset_info: Any) -> None:
            return None

        def get_context(self) -> Any:
            return train_context

        def get_preemption_info(self) -> None:
            return None

        def is_distributed(self) -> bool:
            return False

        def barrier(self) -> None:
            pass

        def broadcast_from_rank_zero(self, data: Any) -> Any:
            return data

    utils = Utils()
    previous = None
    try:
        previous = compat.train_fn_utils()
    except RuntimeError:  # none installed in this process
        pass
    compat.install_train_fn_utils(utils)
    try:
        assert compat.train_fn_utils() is utils
        assert compat.train_run_storage().run_path == context.experiment_fs_path
    finally:
        compat.install_train_fn_utils(previous)

    config = CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="loss",
                              checkpoint_score_order="min")
    manager = compat.one_process_checkpoint_manager(config, context)
    assert compat.latest_checkpoint(manager) is None
    for name, loss in (("checkpoint_a", 1.0), ("checkpoint_b", 2.0), ("checkpoint_c", 3.0)):
        path = context.build_checkpoint_path_from_name(name)
        os.makedirs(path)
        compat.register_checkpoint(manager, Checkpoint(path), {"loss": loss})
    run = tmp_path / "run"
    kept = {p.name for p in run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir()}
    assert kept == {"checkpoint_a", "checkpoint_c"}  # the best, and the latest
    restarted = compat.one_process_checkpoint_manager(config, context)
    assert Path(compat.latest_checkpoint(restarted).path).name == "checkpoint_c"


@pytest.mark.parametrize("damaged, error", [
    ({}, KeyError), ([], TypeError), ({"checkpoint_results": 3}, TypeError),
    ({"checkpoint_results": [{"name": "x"}]}, KeyError),
])
def test_a_snapshot_of_another_shape_raises_what_the_summary_catches(damaged, error) -> None:
    with pytest.raises(error):
        compat.registered_checkpoint_names(damaged)


def test_train_context_logger_is_the_one_compat_quiets() -> None:
    context = importlib.import_module("ray.train.v2._internal.execution.context")
    assert context.logger.name == context.__file__
    before = context.logger.level
    try:
        compat.quiet_ray_train_reports()
        assert context.logger.getEffectiveLevel() == logging.WARNING
    finally:
        context.logger.setLevel(before)


def test_train_run_storage_reads_rays_storage_context(tmp_path: Path) -> None:
    import pyarrow.fs as pafs
    import ray.train

    storage = importlib.import_module("ray.train.v2._internal.execution.storage")
    assert hasattr(ray.train.TrainContext, "get_storage")
    assert params(ray.train.get_context) == []
    assert callable(compat.train_run_storage)
    run = compat.TrainRunStorage(storage.StorageContext(str(tmp_path), "run"))
    assert isinstance(run.filesystem, pafs.LocalFileSystem)
    assert run.run_path == (tmp_path / "run").as_posix()
    assert run.checkpoint_path("checkpoint_x") == (tmp_path / "run" / "checkpoint_x").as_posix()


def test_the_train_controller_is_an_actor_that_runs_user_callbacks() -> None:
    import ray
    from ray.runtime_context import RuntimeContext
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert isinstance(inspect.getattr_static(RuntimeContext, "current_actor"), property)
    start = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    assert "ray.remote(" in start and ")(TrainController)" in start
    callbacks = inspect.getsource(DataParallelTrainer._create_default_callbacks)
    assert "UserCallbackHandler(" in callbacks
    kill = inspect.signature(ray.kill)
    assert list(kill.parameters) == ["actor", "no_restart"]
    assert kill.parameters["no_restart"].kind is inspect.Parameter.KEYWORD_ONLY
    assert callable(compat.train_controller_handle) and callable(compat.kill_train_controller)


def test_worker_callback_interfaces() -> None:
    worker_callback, context_callback = compat.train_worker_callback_bases()
    assert params(worker_callback.after_init_train_context) == ["self"]
    assert params(context_callback.on_report) == ["self"]
    context = importlib.import_module("ray.train.v2._internal.execution.context")
    assert params(context.get_train_context) == []
    assert hasattr(context.TrainContext, "get_world_rank")
    assert callable(compat.internal_train_context)


def test_split_data_config_overrides_the_configure_ray_calls() -> None:
    from ray.train import DataConfig

    assert params(DataConfig.configure) == ["self", "datasets", "world_size", "worker_handles",
                                            "worker_node_ids", "kwargs"]
    config = compat.split_data_config({"val", "test"})
    assert isinstance(config, DataConfig)
    # The private helper the override calls, giving train its own (ordered) options.
    assert config._resolve_execution_options("train").preserve_order is True
    assert config._resolve_execution_options("val").preserve_order is False
    dataset = importlib.import_module("ray.data.dataset").Dataset
    assert isinstance(inspect.getattr_static(dataset, "copy"), staticmethod)
    assert "equal" in params(dataset.streaming_split)


def test_a_trainer_without_ray_datasets_starts_no_dataset_manager() -> None:
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

    assert params(TorchTrainer._create_default_callbacks) == ["self"]
    # The workers' train context takes no shard provider when no callback gives one.
    init = inspect.signature(RayTrainWorker.init_train_context)
    assert init.parameters["dataset_shard_provider"].default is None

    def loop(config: dict) -> None:  # never runs: the trainers are only built
        pass

    assert compat.torch_trainer_class(ray_datasets=True) is TorchTrainer
    without = compat.torch_trainer_class(ray_datasets=False)
    assert issubclass(without, TorchTrainer)
    assert compat.torch_trainer_class(ray_datasets=False) is without  # one class
    full = [type(cb) for cb in TorchTrainer(loop)._create_default_callbacks()]
    lean = [type(cb) for cb in without(loop)._create_default_callbacks()]
    assert DatasetsCallback in full
    assert lean == [cb for cb in full if cb is not DatasetsCallback]


def test_the_parquet_footer_reader_pool_is_sized_by_the_variable_compat_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    module, qualname = compat.DATA_PARQUET_FOOTER_READ_BY.split(":")
    indexer_module = importlib.import_module(module)
    indexer = getattr(indexer_module, qualname.split(".")[0])
    assert re.search(rf'env_integer\(\s*"{compat.DATA_PARQUET_FOOTER_ACTORS_ENV}"',
                     inspect.getsource(indexer.__init__))
    monkeypatch.delenv(compat.DATA_PARQUET_FOOTER_ACTORS_ENV, raising=False)
    assert indexer(ignore_missing_paths=False)._num_actors == 32  # a pool by default
    monkeypatch.setenv(compat.DATA_PARQUET_FOOTER_ACTORS_ENV, "1")
    assert indexer(ignore_missing_paths=False)._num_actors == 1


# --- Ray Tune -------------------------------------------------------------------------------


def test_trials_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    class_cache = importlib.import_module("ray.tune.execution.class_cache")
    assert "ENV_VARS_TO_PROPAGATE" in inspect.getsource(class_cache._ActorClassCache.get)
    source = inspect.getsource(class_cache)
    copied = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
              "AWS_SESSION_TOKEN"}
    assert all(f'"{name}"' in source for name in copied)
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE",
                        set(class_cache.ENV_VARS_TO_PROPAGATE) | copied)
    others = class_cache.ENV_VARS_TO_PROPAGATE - copied
    compat.keep_credentials_out_of_trial_runtime_envs()
    assert class_cache.ENV_VARS_TO_PROPAGATE == others


def test_a_trials_error_is_pickled_on_the_driver_before_the_callbacks_hear_of_it(
        tmp_path: Path) -> None:
    """``trial_error``: Tune writes the error to ``Trial.pickled_error_file`` (the driver's
    copy) in ``handle_error``, which runs before ``Callback.on_trial_error``."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    assert isinstance(Trial.pickled_error_file, property)
    source = inspect.getsource(TuneController._process_trial_failure)
    assert source.index("trial.handle_error(") < source.index("on_trial_error(")
    path = tmp_path / "error.pkl"
    path.write_bytes(pickle.dumps(ValueError("the user's")))
    found = compat.trial_error(types.SimpleNamespace(pickled_error_file=str(path)))
    assert str(found) == "the user's"
    assert compat.trial_error(types.SimpleNamespace(pickled_error_file=None)) is None


def test_tunes_trial_error_logs_come_from_the_loggers_compat_filters() -> None:
    from ray.tune import tune as tune_module
    from ray.tune.execution import tune_controller

    assert {tune_controller.logger.name, tune_module.logger.name} == set(
        compat.TUNE_ERROR_LOGGERS)
    assert 'logger.error(f"Trial task failed' in inspect.getsource(tune_controller)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger, handler = tune_controller.logger, Keep()
    logger.addHandler(handler)
    try:
        with compat.tune_error_logs_filtered(lambda record: "drop" in record.getMessage()):
            logger.error("drop me")
            logger.error("keep me")
        logger.error("drop me, now kept")
    finally:
        logger.removeHandler(handler)
    assert seen == ["keep me", "drop me, now kept"]


def test_tunes_start_up_box_is_off_while_silenced_and_the_variable_comes_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune.experimental.output import TuneTerminalReporter, get_air_verbosity

    # The premise: the new engine's reporter prints its box whatever the verbosity.
    assert "Configuration for experiment" in inspect.getsource(
        TuneTerminalReporter.experiment_started)
    assert compat.TUNE_NEW_OUTPUT_ENV in inspect.getsource(get_air_verbosity)
    monkeypatch.delenv(compat.TUNE_NEW_OUTPUT_ENV, raising=False)
    assert get_air_verbosity(0) is not None  # the new engine, by default
    with compat.tune_output_silenced():
        assert get_air_verbosity(0) is None  # the legacy engine, silent at verbose=0
    assert compat.TUNE_NEW_OUTPUT_ENV not in os.environ
    monkeypatch.setenv(compat.TUNE_NEW_OUTPUT_ENV, "1")
    with compat.tune_output_silenced():
        assert get_air_verbosity(0) is None
    assert os.environ[compat.TUNE_NEW_OUTPUT_ENV] == "1"


def test_unhandled_task_errors_are_quieted_by_the_variable_ray_reads_each_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.worker import Worker

    assert compat.IGNORE_UNHANDLED_ERRORS_ENV in inspect.getsource(Worker.raise_errors)
    monkeypatch.delenv(compat.IGNORE_UNHANDLED_ERRORS_ENV, raising=False)
    compat.quiet_unhandled_task_errors()
    assert os.environ[compat.IGNORE_UNHANDLED_ERRORS_ENV] == "1"


# --- Weights & Biases -----------------------------------------------------------------------


def test_the_tune_session_queues_compat_waits_on() -> None:
    """The race ``wait_for_tune_to_take_the_last_report`` closes: Tune's function wrapper
    reports a last result after the function returns, and the main thread moves the inter-actor
    queue's reports into the same one-place result queue."""
    from ray.train._internal import session
    from ray.tune.trainable import function_trainable

    init = inspect.getsource(session._TrainSession.reset)  # what __init__ calls
    assert "self.result_queue = queue.Queue(1)" in init
    assert "self._inter_actor_queue: Optional" in init
    moving = inspect.getsource(session._TrainSession._get_result_from_queues)
    assert "self._inter_actor_queue.get(" in moving and "self.report(inter_actor_item)" in moving
    assert "get_session().report({RESULT_DUPLICATE: True})" in inspect.getsource(
        function_trainable)
    assert params(session.get_session) == []
    compat.wait_for_tune_to_take_the_last_report(timeout_s=1)  # no session here: returns


def test_the_pbt_methods_compat_overrides_are_tunes_own() -> None:
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pbt import _PBTTrialState

    pbt = PopulationBasedTraining
    assert params(pbt._checkpoint_or_exploit) == ["self", "trial", "tune_controller",
                                                  "upper_quantile", "lower_quantile"]
    assert params(pbt._exploit) == ["self", "tune_controller", "trial", "trial_to_clone"]
    assert params(pbt._get_new_config) == ["self", "trial", "trial_to_clone"]
    # The exploiting trial restores from the donor state's last_checkpoint, as set by compat.
    assert "new_state.last_checkpoint" in inspect.getsource(pbt._exploit)
    assert "self._get_new_config(trial, trial_to_clone)" in inspect.getsource(pbt._exploit)
    state = _PBTTrialState(trial=types.SimpleNamespace(experiment_tag="0"))
    assert {"last_result", "last_checkpoint", "last_score"} <= set(vars(state))
    assert params(pbt.choose_trial_to_run) == ["self", "tune_controller"]
    assert "self._next_perturbation_sync" in inspect.getsource(pbt.choose_trial_to_run)
    hooks = compat.PBTHooks(*(lambda *a: None,) * 5, last_epoch=4, max_running=2)
    scheduler = compat.pbt_scheduler(hooks, metric="val_loss", mode="min",
                                     hyperparam_mutations={"lr": [0.1, 0.2]})
    assert isinstance(scheduler, pbt)
    assert (scheduler._metric, scheduler._metric_op, scheduler._trial_state) == (
        "val_loss", -1.0, {})


def test_wandb_settings_turn_system_metrics_off() -> None:
    import wandb
    from wandb.proto import wandb_settings_pb2

    assert wandb.Settings.model_fields["x_disable_stats"].annotation is bool
    assert "x_disable_stats" in wandb_settings_pb2.Settings.DESCRIPTOR.fields_by_name
    settings = compat.wandb_settings(console="off", silent=True, init_timeout=30)
    assert settings == wandb.Settings(console="off", x_disable_stats=True, silent=True,
                                      init_timeout=30)


# --- fastai ---------------------------------------------------------------------------------


def test_fake_loader_is_what_a_fastai_dataloader_iterates_through() -> None:
    from fastai.data.load import DataLoader, _FakeLoader

    assert params(_FakeLoader.__init__) == [
        "self", "d", "pin_memory", "num_workers", "timeout", "persistent_workers",
        "pin_memory_device"]
    like = DataLoader(list(range(6)), bs=2)
    dl = DataLoader(list(range(6, 10)), bs=2)
    dl.fake_l = None  # so that only compat's loader can make it iterate
    compat.attach_fastai_fake_loader(dl, like=like)
    assert isinstance(dl.fake_l, _FakeLoader) and dl.fake_l.d is dl
    assert [b.tolist() for b in dl] == [[6, 7], [8, 9]]


def test_save_model_callback_saves_through_its_private_hook(tmp_path: Path) -> None:
    from fastai.callback.tracker import SaveModelCallback

    assert params(SaveModelCallback._save) == ["self", "name"]
    for event in ("after_epoch", "after_fit"):
        assert "self._save(" in inspect.getsource(getattr(SaveModelCallback, event))
    base = compat.fastai_save_model_callback()
    assert base is compat.fastai_save_model_callback() and issubclass(base, SaveModelCallback)

    class Recording(base):
        def save_model(self, name: str) -> None:
            self.saved = name

    cb = Recording(fname="m", at_end=True)
    cb._save("m")  # what fastai's after_epoch / after_fit call
    assert cb.saved == "m"


# --- torchmetrics ---------------------------------------------------------------------------


def test_torchmetric_reductions_name_each_states_reduction() -> None:
    import torchmetrics
    from torchmetrics.classification import MulticlassAUROC

    class Custom(torchmetrics.Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state("kept", default=[], dist_reduce_fx="cat")
            self.add_state("avg", default=torch.tensor(0.0), dist_reduce_fx="mean")
            self.add_state("high", default=torch.tensor(0.0), dist_reduce_fx="max")
            self.add_state("stacked", default=torch.tensor(0.0), dist_reduce_fx=None)
            self.add_state("own", default=torch.tensor(0.0), dist_reduce_fx=lambda t: t[0])

        def update(self) -> None: ...

        def compute(self) -> torch.Tensor:
            return self.total

    assert compat.torchmetric_reductions(Custom()) == {
        "total": "sum", "kept": "cat", "avg": "mean", "high": "max", "stacked": "none",
        "own": "custom"}
    assert compat.torchmetric_reductions(MulticlassAUROC(num_classes=2)) == {
        "preds": "cat", "target": "cat"}


# --- Nothing outside compat -----------------------------------------------------------------

FORBIDDEN_TEXT = [
    (re.compile(r"\b_private\b"), "a _private module"),
    (re.compile(r"\._internal\b"), "an _internal module"),
    (re.compile(r"RAY_TRAIN_"), "a Ray Train internal variable"),
    (re.compile(r"checkpoint_manager_snapshot|validate_storage_marker|ray_bootstrap_config"),
     "a file Ray writes for itself"),
    (re.compile(r"\bRAY_worker_"), "a Ray system-config variable"),
    (re.compile(r"\bx_disable_stats\b"), "an internal W&B setting"),
]


def private_uses(source: str) -> list[str]:
    """What in ``source`` is a private API of Ray, W&B or fastai (one line each)."""
    found = [f"{line}: {what}" for line, text in enumerate(source.splitlines(), 1)
             for pattern, what in FORBIDDEN_TEXT if pattern.search(text)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            names = [*node.module.split("."), *(a.name for a in node.names)]
            if any(_private(n) for n in names):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(_private(p) for p in parts):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in LIBRARIES:
                found.append(f"{node.lineno}: {root.id}....{node.attr}")
        elif isinstance(node, ast.Call) and _called(node) == "Settings" and any(
                (k.arg or "").startswith("x_") for k in node.keywords):
            found.append(f"{node.lineno}: an x_ setting of W&B")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def project_files() -> list[Path]:
    files = [p for folder in ("orchestrator", "workers", "bench")
             for p in sorted((REPO / folder).rglob("*.py"))]
    return [p for p in files if p != COMPAT_FILE]


def test_the_guard_sees_what_compat_does() -> None:
    assert len(private_uses(COMPAT_FILE.read_text())) >= 10
    for snippet in ("from fastai.data.load import _FakeLoader",
                    "import ray._private.worker", "ray._private.worker.get_dashboard_url()",
                    "from ray.train.v2._internal.execution import context",
                    "wandb.Settings(x_other=True)", "os.environ['RAY_TRAIN_X'] = '1'",
                    "open('checkpoint_manager_snapshot.json')"):
        assert private_uses(snippet), snippet
    assert private_uses("x_train, y = 1, 2\nself._save(name)\nfrom ray.train import report") \
        == []


def test_no_private_api_outside_compat() -> None:
    found = {str(p.relative_to(REPO)): private_uses(p.read_text()) for p in project_files()}
    assert {path: uses for path, uses in found.items() if uses} == {}


def _classes_overriding_private_methods() -> list[tuple[str, str, list[str]]]:
    """(module, class, its single-underscore methods) for top-level classes with bases."""
    out = []
    for path in project_files():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.bases:
                methods = [f.name for f in node.body
                           if isinstance(f, ast.FunctionDef) and _private(f.name)]
                if methods:
                    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                    out.append((module, node.name, methods))
    return out


def test_no_private_method_of_a_library_class_is_overridden_outside_compat() -> None:
    overridden = []
    for module, name, methods in _classes_overriding_private_methods():
        cls = getattr(importlib.import_module(module), name)
        for base in cls.__mro__[1:]:
            if base.__module__.split(".")[0] in LIBRARIES:
                overridden += [f"{module}.{name}.{m} ({base.__module__}.{base.__name__})"
                               for m in methods if m in vars(base)]
    assert overridden == []
