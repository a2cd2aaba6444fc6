"""The run configuration: one typed tree, shared by the driver and the workers.

The driver validates it at the edge (YAML + ``--set``) and sends it into Ray as a plain
dict (``model_dump(mode="json")``); each worker validates that dict again with the same
schema, so both sides agree on every default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from workers.contract.direction import resolve as resolve_direction

# What pyarrow (and so Ray Train) can write checkpoints to, besides a local path.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")

# Characters W&B refuses in a project name (wandb_settings.validate_project), and its length.
WANDB_PROJECT_FORBIDS = ("/", "\\", "#", "?", "%", ":")
WANDB_PROJECT_MAX = 128


def wandb_project_problem(project: str) -> str | None:
    """Why W&B would refuse ``project`` as a project name; None when it takes it."""
    found = [c for c in WANDB_PROJECT_FORBIDS if c in project]
    if found:
        return (f"W&B project names cannot contain {' '.join(WANDB_PROJECT_FORBIDS)} "
                f"(found {' '.join(found)})")
    if len(project) > WANDB_PROJECT_MAX:
        return f"W&B project names are at most {WANDB_PROJECT_MAX} characters"
    return None


# Counts are strict integers: YAML's `true` or `2.5` is a mistake, not 1 or 2.
Int = Annotated[int, Strict()]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorkloadConfig(_Section):
    """What to train (the only required section): a function of yours that builds it."""

    entrypoint: str = Field(description="'module:function' returning the workload")
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of that function, checked "
        "against its signature before anything starts")

    @field_validator("entrypoint")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        module, sep, func = value.partition(":")
        if not sep or not module or not func or ":" in func:
            raise ValueError(f"must look like 'package.module:function', got {value!r}")
        return value


class ScalingSection(_Section):
    """How many Ray Train workers, on what hardware, and how the model is spread over them."""

    num_workers: Int | list[Int] = Field(
        2, description="data-parallel workers (one per GPU or slot); [min, max]: an elastic "
        "run, on as many workers as the cluster has room for, at least min")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: GPUs if the cluster has any")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each worker (a finite number)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model and optimizer state; fsdp: "
        "each holds a 1/N shard of both (models that outgrow one GPU; needs engine torch and "
        "at least 2 workers)")
    fsdp_blocks: list[str] | None = Field(
        None, description="fsdp: class names of the modules sharded as units (default: the "
        "workload's fsdp_blocks, else each direct child of the model with parameters)")
    find_unused_parameters: bool | Literal["auto"] = Field(
        "auto", description="ddp: whether a step may leave some parameters without a gradient "
        "(an unused head, LayerDrop, an auxiliary branch); auto: found out from a forward and "
        "backward of the first batch (in eval mode: LayerDrop, random in training only, needs "
        "true); true: always look (slower); false: never (DDP fails on such a model, in one "
        "line naming this key). Frozen (requires_grad=False) parameters "
        "never count. Lightning's ddp_find_unused_parameters_true, transformers' "
        "ddp_find_unused_parameters")

    @field_validator("num_workers")
    @classmethod
    def _count_or_range(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"must be at least 1, got {value}")
            return value
        if len(value) != 2 or not 1 <= value[0] <= value[1]:
            raise ValueError(f"an elastic range is [min, max] with 1 <= min <= max, got {value}")
        return value[0] if value[0] == value[1] else value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def describe_workers(self) -> str:
        if isinstance(self.num_workers, list):
            return f"{self.num_workers[0]}-{self.num_workers[1]} workers (elastic)"
        return f"{self.num_workers} worker{'s' if self.num_workers != 1 else ''}"


class TrainSection(_Section):
    """The optimisation itself: epochs, batches, optimizer, precision, learning rate schedule."""

    epochs: Int = Field(20, ge=1, description="epochs to train, numbered from 1; raise it to "
                        "train a finished run longer with --resume")
    batch_size: Int = Field(64, ge=1, description="per worker: the global batch is "
                            "batch_size x workers")
    lr: float = Field(1e-3, gt=0, description="learning rate, a finite number (one_cycle: "
                      "its peak); not rescaled with the number of workers")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="adam and sgd (momentum 0.9) apply weight_decay as L2, adamw "
        "decoupled; a fastai Learner workload keeps its own optimizer")
    weight_decay: float = Field(0.0, ge=0, description="a finite number; 0: none")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: forward passes and losses under bfloat16 autocast (GPU or CPU); the "
        "weights, optimizer state, checkpoints, losses and metric statistics stay float32/64",
    )
    stop_on_nonfinite: bool = Field(
        True, description="stop the run at the first epoch whose loss or a metric is NaN or "
        "infinite (such an epoch never becomes the best either way); with train.ema_decay, "
        "the metrics of the weights chosen, not those of the ones that lost")
    loader_workers: Literal["auto"] | Annotated[Int, Field(ge=0)] = Field(
        "auto",
        description="DataLoader worker processes per rank and split (persistent between "
        "epochs; pinned memory on GPU); auto: none for in-memory tensors (a TensorDataset), "
        "else as many as the worker's CPUs, 2 to 8")
    schedule: Literal["auto", "constant", "linear", "cosine", "one_cycle", "step"] = Field(
        "auto",
        description="learning rate per optimizer step, after a linear warmup from 0 over "
        "warmup_steps: constant; linear or cosine (half a cosine) to 0 at the last step, as "
        "transformers' get_linear/cosine_schedule_with_warmup; one_cycle (lr is the peak, "
        "reached after warmup_steps, default 30% of the steps; fastai's fit_one_cycle for "
        "engine fastai); step (x step_gamma every step_size steps); auto: one_cycle for "
        "engine fastai, else constant. A workload's own scheduler() replaces it",
    )
    warmup_steps: Int = Field(0, ge=0, description="optimizer steps of linear warmup (at most "
                              "the run's steps: epochs x batches per worker / grad_accum_steps)")
    step_size: Int | None = Field(None, ge=1, description="schedule step: optimizer steps "
                                  "between decays; default: a third of the steps after warmup")
    step_gamma: float = Field(0.1, gt=0, le=1, description="schedule step: the factor of each "
                              "decay")
    grad_clip_norm: float | None = Field(
        None, gt=0, description="clip the gradients to this global L2 norm before each "
        "optimizer step (computed across the shards under fsdp); null: no clipping")
    grad_accum_steps: Int = Field(
        1, ge=1, description="micro-batches (of batch_size) per optimizer step: the "
        "gradients are summed, and synchronised between workers only on the last one")
    eval_every_n_steps: Int | None = Field(
        None, ge=1, description="evaluate (exactly, the whole validation set), let the tracker "
        "decide and save by the checkpoint policy every N optimizer steps, and at the last; "
        "checkpoints taken mid-epoch resume at the next batch; null: at each epoch's end. "
        "Checkpoint policies then count evaluations where they say epochs")
    max_steps: Int | None = Field(
        None, ge=1, description="train this many optimizer steps, instead of train.epochs "
        "(the last epoch stops where they end); null: train.epochs")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights "
        "(ema = decay * ema + (1 - decay) * weights after each optimizer step; sharded like "
        "the model under fsdp); every evaluation scores the raw and the EMA weights exactly, "
        "the tracker decides on the better one (tracker.monitor) and the saved model is the "
        "winner (its metadata says weights: raw | ema). Engine torch only; null: no EMA")


class Smoothing(_Section):
    """``tracker.smoothing``: exactly one of ``ema`` and ``window``."""

    ema: float | None = Field(None, gt=0, lt=1, description="the previous smoothed value's "
                              "weight, 0 < ema < 1")
    window: Int | None = Field(None, ge=2, description="the number of last values averaged")

    @model_validator(mode="after")
    def _one_of(self) -> Smoothing:
        if (self.ema is None) == (self.window is None):
            raise ValueError("give exactly one of ema (0 < ema < 1) and window (>= 2), e.g. "
                             "{ema: 0.5} or {window: 3}")
        return self


class AlsoMonitor(_Section):
    """One of ``tracker.also_monitor``: a metric whose best model is kept too."""

    monitor: str = Field(description="a reported metric: train_* or val_*")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="as tracker.mode, for this metric")

    @field_validator("monitor")
    @classmethod
    def _reported_during_training(cls, value: str) -> str:
        return TrackerSection._reported_during_training(value)


class TrackerSection(_Section):
    """The best-model tracker on rank 0: which metric decides what the best epoch is."""

    monitor: str = Field("val_loss", description="a reported metric: train_* or val_* "
                         "(test_* is computed after training, with the best weights); one the "
                         "run does not report is refused before the first epoch")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="whether lower or higher is better; auto: the direction the "
        "monitored metric's object declares (torchmetrics' higher_is_better, or the same "
        "attribute on a workload's own metric), else the table of name words below (loss, "
        "mse, perplexity, ... min; accuracy, f1, auroc, ... max); a name it cannot place is "
        "refused before anything starts. Lightning's mode, transformers' "
        "greater_is_better")
    min_delta: float = Field(0.0, ge=0, description="a finite number, for patience only: an "
                             "evaluation counts as progress when it beats the best by more "
                             "than this (the best model is always the strictly best value; a "
                             "tie never improves; NaN and inf never do). Lightning's and "
                             "Keras' min_delta, transformers' early_stopping_threshold")
    patience: Int | None = Field(None, ge=1, description="stop after N evaluations without "
                                 "progress (by more than min_delta). Lightning's and Keras' "
                                 "patience, transformers' early_stopping_patience")
    smoothing: Smoothing | None = Field(
        None, description="opt-in: decide (best, progress, thresholds) on a smoothed monitored "
        "value, {ema: a} (s = a * s + (1 - a) * value, 0 < a < 1) or {window: n} (the mean of "
        "the last n values); the saved model is the weights of the evaluation the decision was "
        "made at; the record keeps both (<monitor>_smoothed); null: the raw value")
    stop_at: float | None = Field(
        None, description="stop once the monitored value is better than this (Lightning's "
        "EarlyStopping stopping_threshold); null: never")
    divergence: float | None = Field(
        None, description="stop once the monitored value is worse than this (Lightning's "
        "EarlyStopping divergence_threshold); null: never")
    baseline: float | None = Field(
        None, description="with patience: an evaluation counts as progress only if it also "
        "beats this, so the run stops when the baseline is not beaten within patience "
        "evaluations (Keras' EarlyStopping baseline); null: none")
    start_from_epoch: Int = Field(
        0, ge=0, description="evaluations of epochs up to this one never count for patience "
        "(Keras' EarlyStopping start_from_epoch; a warmup's noisy epochs); they can still be "
        "the best model")
    initial_best: float | None = Field(
        None, description="no model is the best (nor saved by policy best) until one is "
        "strictly better than this (Keras' ModelCheckpoint initial_value_threshold); null: none")
    also_monitor: list[AlsoMonitor] = Field(
        default_factory=list, description="policy best: more metrics, [{monitor, mode}, ...], "
        "each keeping its own best model (the strictly best value, as tracker.monitor's; one "
        "checkpoint when several choose the same evaluation, decided on the raw value); "
        "tracker.monitor alone decides early stopping, searches and best, and smoothing, the "
        "thresholds and initial_best apply to it alone. summary.json's best_by_monitor, W&B "
        "aliases best-<metric>, a row each in `orchestrator best`; the test split is scored "
        "with each distinct best")

    @field_validator("monitor")
    @classmethod
    def _reported_during_training(cls, value: str) -> str:
        # test_* is computed once, after training, with the best weights: it cannot pick them.
        if not value.startswith(("train_", "val_")):
            raise ValueError(
                f"must be a metric reported every epoch (train_* or val_*, e.g. val_loss), "
                f"got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _also_monitor_distinct(self) -> TrackerSection:
        seen = [self.monitor]
        for also in self.also_monitor:
            if also.monitor in seen:
                what = ("is tracker.monitor" if also.monitor == self.monitor
                        else "is given twice")
                raise ValueError(f"tracker.also_monitor: {also.monitor!r} {what}; give each "
                                 "metric once")
            seen.append(also.monitor)
        return self

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        """min or max: as set, or by the monitor's name (``contract.direction``). A run's
        driver pins ``mode`` first, from the metric objects' own declarations too."""
        return resolve_direction(self.monitor, self.mode).mode


def monitor_mode(monitor: str, mode: str) -> Literal["min", "max"]:
    """``mode`` as set, or for ``auto`` from the monitor's name (a name the table cannot place
    is refused): see ``workers.contract.direction``."""
    return resolve_direction(monitor, mode).mode


class CheckpointSection(_Section):
    """Which epochs are saved as checkpoints, and which of them Ray keeps."""

    policy: Literal["best", "every_n", "all", "last", "none"] = Field(
        "best", description="best: when the monitored metric improves; every_n: every "
        "every_n_epochs epochs; all: every epoch; last: the final epoch; none: never")
    every_n_epochs: Int = Field(1, ge=1, description="for policy every_n")
    keep_top_k: Int = Field(
        1, ge=1, description="for policy best: the models of the K best evaluations are kept "
        "(an evaluation is saved when it is strictly better than the K-th best so far), each "
        "with its rank; summary.json lists them best first (best_checkpoints), W&B gives them "
        "the aliases best, top-2, ... (top-1, ... when average_top_k's average won and took "
        "best); the test split is scored with the best")
    average_top_k: Int | None = Field(
        None, ge=2, description="opt-in, for policy best with keep_top_k at least K: at the "
        "run's end, the uniform average of the K best models' weights (BatchNorm statistics "
        "recomputed on the training split) is scored on the whole validation split; it becomes "
        "the best model (best_checkpoint, averaged_top_<K>/; the test split is scored with it) "
        "only if its monitored value is strictly better than the single best's; summary.json "
        "says which won and by how much (averaged); null: off")
    resume_every_n_epochs: Int = Field(
        0, ge=0, description="extra full-state checkpoints (with the optimizer) every N "
        "epochs, so that a restart loses at most N epochs; 0: off")


class FailureSection(_Section):
    """What a run does when workers fail or are lost."""

    max_failures: Int = Field(0, ge=-1, description="worker-group restarts; -1: unlimited")
    worker_wait_s: Int = Field(
        900, ge=1, description="how long a run whose workers were lost (a node gone) waits "
        "for the cluster to have room for them again before it stops")
    preempt_grace_s: Int = Field(
        60, ge=0, description="engine torch: on SIGTERM or SIGINT, the time the workers have to "
        "finish the step in flight and save a resume checkpoint of it (--resume goes on at the "
        "next step); a second signal stops at once; 0: stop at once, keeping what was saved")


class WandbSection(_Section):
    """Weights & Biases logging, from the driver only."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online with credentials (WANDB_API_KEY or wandb login), "
        "else offline; disabled: wandb is not even imported")
    project: str | None = Field(
        None, description="W&B project; default: the run's name. At most 128 characters, "
        "none of " + " ".join(WANDB_PROJECT_FORBIDS) + " (W&B refuses them)")
    entity: str | None = Field(None, description="W&B entity (user or team); default: W&B's "
                               "own default for your credentials")
    @field_validator("project")
    @classmethod
    def _wandb_takes_it(cls, value: str | None) -> str | None:
        if value is not None:
            problem = wandb_project_problem(value)
            if problem:
                raise ValueError(f"{problem}, got {value!r}")
        return value

    log_model: Literal["policy", "best", "end", "none"] = Field(
        "policy", description="policy: the models the checkpoint policy saves; best: its "
        "improvements; end: only the final ones, after training; none")
    keep: Literal["best", "best_and_last", "all"] = Field(
        "best_and_last", description="the versions W&B keeps of the run's model: the best, "
        "the best and the last logged, or every one")
    model_files: Literal["copy", "reference"] = Field(
        "copy", description="copy: upload the model files to W&B; reference: storage on s3:// "
        "or gs:// only, the artifact points at the checkpoint in the bucket (nothing uploaded "
        "twice; logged when the run ends)")


class TuneSection(_Section):
    """The Ray Tune search of ``orchestrator tune``."""

    num_samples: Int = Field(4, ge=1, description="draws of the non-grid keys, per grid point")
    max_concurrent_trials: Int = Field(2, ge=1, description="trials running at the same "
                                       "time (may change on a resume)")
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: every trial drawn up front from the seed ({grid} keys "
        "enumerated); grid: every combination of the {grid} and {choice} keys, num_samples "
        "times; optuna: each trial proposed by Optuna's TPE sampler from the trials finished so "
        "far (their best monitored values)")
    startup_trials: Int | None = Field(
        None, ge=1, description="optuna: trials drawn at random before TPE proposes from "
        "results; default: a quarter of num_samples, at least 1, at most 10")
    scheduler: Literal["fifo", "asha", "pbt"] = Field(
        "fifo", description="fifo: every trial runs to its end; asha: bad trials are stopped "
        "early on the monitored metric; pbt: population-based training, every "
        "perturbation_interval epochs the worst quarter of the trials continue from the best "
        "quarter's weights with perturbed train.lr / weight_decay / grad_clip_norm")
    perturbation_interval: Int = Field(
        2, ge=1, description="pbt: epochs between exploit/explore steps (shorter than "
        "train.epochs)")
    grace_period: Int = Field(1, ge=1, description="asha: epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/reduction_factor")
    seed: Int | None = Field(None, ge=0, description="search seed; default: the run's seed")
    one_worker_trials: Literal["in_trial", "ray_train"] = Field(
        "in_trial", description="in_trial: a trial of one CPU worker (no Ray Datasets) "
        "trains in its Tune trial's own process, without a Ray Train run's controller and "
        "worker group (the same records, checkpoints and retention); ray_train: every trial is "
        "a Ray Train run, as trials of several workers, on GPUs or with Ray "
        "Datasets always are")
    search_space: dict[str, Any] = Field(
        default_factory=dict, description="dotted config keys, each mapped to one of "
        "{choice: [...]}, {grid: [...]}, {uniform: [low, high]}, {loguniform: [low, high]}, "
        "{randint: [low, high]} (high exclusive)")


# (key, its default, the key it goes with, the values of that key that use it): see
# RunConfig._partners_given.
_PARTNERS: tuple[tuple[str, Any, str, tuple[str, ...]], ...] = (
    ("train.step_size", None, "train.schedule", ("step",)),
    ("train.step_gamma", 0.1, "train.schedule", ("step",)),
    ("checkpoint.every_n_epochs", 1, "checkpoint.policy", ("every_n",)),
    ("checkpoint.keep_top_k", 1, "checkpoint.policy", ("best",)),
    ("checkpoint.average_top_k", None, "checkpoint.policy", ("best",)),
    ("tracker.also_monitor", [], "checkpoint.policy", ("best",)),
    ("scaling.fsdp_blocks", None, "scaling.strategy", ("fsdp",)),
    ("scaling.find_unused_parameters", "auto", "scaling.strategy", ("ddp",)),
    ("tune.startup_trials", None, "tune.search", ("optuna",)),
    ("tune.grace_period", 1, "tune.scheduler", ("asha",)),
    ("tune.reduction_factor", 2.0, "tune.scheduler", ("asha",)),
    ("tune.perturbation_interval", 2, "tune.scheduler", ("pbt",)),
)


class RunConfig(_Section):
    """One run (or search): the keys of the YAML file. Every key has a default except
    ``workload``; unknown keys are refused. A key that only one value of another key uses
    (train.step_size and step_gamma: schedule step; checkpoint.every_n_epochs: policy every_n;
    checkpoint.keep_top_k and tracker.also_monitor: policy best;
    scaling.fsdp_blocks: strategy fsdp; scaling.find_unused_parameters: strategy ddp;
    tracker.min_delta: a patience; tune.startup_trials: search optuna; tune.grace_period and
    reduction_factor: scheduler asha; tune.perturbation_interval: scheduler pbt) is refused
    when given, not at its default, beside another value: it would do nothing, so it is a
    leftover or a partner forgotten, and a run that silently ignores a setting is worse than
    one line saying so (the fastai and loop engines refuse the train keys they ignore)."""

    name: str = Field("run", min_length=1, description="the run's directory under "
                      "storage_path: a plain name (no '/', not hidden)")
    storage_path: str = Field(
        "./runs", min_length=1, description="a local directory (relative: to where the "
        "command runs) or a pyarrow URI: " + ", ".join(s + "://" for s in STORAGE_SCHEMES)
        + "; on a cluster, storage every node can reach")
    seed: Int = Field(0, ge=0, description="initial weights (the same on every rank), the "
                      "shuffles, each rank's per-epoch random streams")
    workload: WorkloadConfig
    engine: Literal["torch", "fastai", "loop"] = Field(
        "torch", description="torch: the project's own epoch loop; fastai: fastai's fit on "
        "every worker; loop: the workload's own loop(ctx) on every worker")
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    tracker: TrackerSection = Field(default_factory=TrackerSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    failure: FailureSection = Field(default_factory=FailureSection)
    wandb: WandbSection = Field(default_factory=WandbSection)
    tune: TuneSection = Field(default_factory=TuneSection)

    @field_validator("name", mode="before")
    @classmethod
    def _number_as_name(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("storage_path")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, _ = value.partition("://")
        if sep and scheme.lower() not in STORAGE_SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r} in {value!r}; use a local path or one "
                             f"of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        # 's3:/bucket' or 's3:bucket' is a URI missing a slash, not a local folder named 's3:'.
        scheme, colon, rest = value.partition(":")
        if not sep and colon and scheme.lower() in STORAGE_SCHEMES:
            rest = rest.lstrip("/")
            meant = f"{scheme}:///{rest}" if scheme.lower() == "file" else f"{scheme}://{rest}"
            raise ValueError(f"{value!r} is not a URI ({scheme}: needs two slashes); write "
                             f"{meant!r}")
        return value

    @field_validator("name")
    @classmethod
    def _safe_dir_name(cls, value: str) -> str:
        if "/" in value or value in (".", "..") or value.startswith("."):
            raise ValueError(f"must be a plain directory name (no '/', not hidden), got {value!r}")
        return value

    @model_validator(mode="after")
    def _finite_numbers(self) -> RunConfig:
        for section, key in (("train", "lr"), ("train", "weight_decay"), ("tracker", "min_delta"),
                             ("scaling", "cpus_per_worker"), ("tune", "reduction_factor"),
                             ("tracker", "stop_at"), ("tracker", "divergence"),
                             ("tracker", "baseline"), ("tracker", "initial_best")):
            value = getattr(getattr(self, section), key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{section}.{key}: must be a finite number, got {value!r}")
        if self.tracker.baseline is not None and self.tracker.patience is None:
            raise ValueError("tracker.baseline: it must be beaten within tracker.patience "
                             "evaluations; set tracker.patience too (e.g. 3)")
        if self.wandb.model_files == "reference" and not self.storage_path.lower().startswith(
                ("s3://", "gs://", "gcs://")):
            raise ValueError("wandb.model_files: reference points W&B at the checkpoints in an "
                             "object store, and storage_path is not one (s3://, gs://); use "
                             "copy")
        if self.scaling.strategy == "fsdp":
            if self.engine == "fastai":
                raise ValueError("scaling.strategy: fsdp is for engine: torch (a fastai Learner "
                                 "trains data-parallel only); use scaling.strategy: ddp")
            if self.scaling.min_workers < 2:
                raise ValueError("scaling.strategy: fsdp shards the model over the workers and "
                                 "needs at least 2 (scaling.num_workers); with 1, use ddp")
        self._engine_trains_with_these()
        self._partners_given()
        self._averaging_fits()
        self._schedulers_fit_the_run()
        if not self.wandb.project and self.wandb.mode != "disabled":
            problem = wandb_project_problem(self.name)
            if problem:
                raise ValueError(f"wandb.project: not set, so it is the run's name "
                                 f"{self.name!r}, and {problem}; set wandb.project")
        return self

    def _partners_given(self) -> None:
        """A key that only one value of another key uses, given (not left at its default) with
        another value: it would do nothing, so it is a mistake (a leftover, or the partner
        forgotten or mistyped), refused as the engines refuse the keys they ignore."""
        for key, default, partner, used_with in _PARTNERS:
            value, partner_value = self._dotted(key), self._dotted(partner)
            if value != default and partner_value not in used_with:
                uses = " or ".join(used_with)
                raise ValueError(f"{key}: only {partner} {uses} uses it, and {partner} is "
                                 f"{partner_value}; leave it out or set {partner}: {uses}")
        if self.tracker.min_delta and self.tracker.patience is None:
            raise ValueError("tracker.min_delta: only tracker.patience uses it (what counts as "
                             "progress; the best model is always the strictly best value), and "
                             "tracker.patience is null; leave it out or set tracker.patience")

    def _averaging_fits(self) -> None:
        """checkpoint.average_top_k: it averages models the run kept, scores them on the
        validation split, and recomputes BatchNorm with the project's own forward pass."""
        k = self.checkpoint.average_top_k
        if k is None:
            return
        if self.checkpoint.keep_top_k < k:
            raise ValueError(f"checkpoint.average_top_k: {k} averages the {k} best models, and "
                             f"checkpoint.keep_top_k ({self.checkpoint.keep_top_k}) keeps "
                             f"fewer; set checkpoint.keep_top_k to at least {k}")
        if not self.tracker.monitor.startswith("val_"):
            raise ValueError(f"checkpoint.average_top_k: the average is scored on the "
                             f"validation split, and tracker.monitor ({self.tracker.monitor}) "
                             "is not a val_ metric; monitor a val_ metric or leave it out")
        if self.engine == "fastai":
            raise ValueError("checkpoint.average_top_k: engine fastai's Learner makes its own "
                             "batches; leave it out or use engine: torch")

    def _schedulers_fit_the_run(self) -> None:
        """What Ray Tune's ASHA and PBT assert about their intervals and the run's length
        (``max_t`` is ``train.epochs``), said as the key to change."""
        t, epochs = self.tune, self.train.epochs
        if t.scheduler == "asha" and t.grace_period > epochs:
            raise ValueError(f"tune.grace_period: {t.grace_period} epochs is longer than the "
                             f"run (train.epochs: {epochs}); ASHA stops no trial before it; "
                             f"use at most {epochs}")
        if t.scheduler == "pbt" and t.perturbation_interval >= epochs:
            raise ValueError(f"tune.perturbation_interval: {t.perturbation_interval} epochs is "
                             f"not shorter than the run (train.epochs: {epochs}); no trial "
                             f"would ever exploit another; use at most {epochs - 1}")

    def _dotted(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def _engine_trains_with_these(self) -> None:
        """The optimisation keys an engine other than torch does not take."""
        t = self.train
        given = [key for key, default in (("warmup_steps", 0), ("grad_clip_norm", None),
                                          ("grad_accum_steps", 1), ("step_size", None),
                                          ("eval_every_n_steps", None), ("max_steps", None),
                                          ("ema_decay", None))
                 if getattr(t, key) != default]
        if self.engine == "fastai":
            if t.schedule not in ("auto", "one_cycle", "constant"):
                given.insert(0, "schedule")
            if given:
                raise ValueError(f"train.{given[0]}: engine fastai trains with the Learner's "
                                 "fit_one_cycle or fit (train.schedule one_cycle or constant) "
                                 "and its own callbacks; leave it out or use engine: torch")
        if self.engine == "loop":
            if t.schedule != "auto":
                given.insert(0, "schedule")
            if given:
                raise ValueError(f"train.{given[0]}: engine loop trains as the workload's "
                                 "loop(ctx) does (it reads ctx.config.train); leave it out")

    @property
    def schedule(self) -> str:
        """``train.schedule`` with ``auto`` resolved for this run's engine."""
        if self.train.schedule == "auto":
            return "one_cycle" if self.engine == "fastai" else "constant"
        return self.train.schedule

    @property
    def autocast_precision(self) -> str:
        """The precision of forward passes under autocast: under fsdp bf16 is FSDP's own
        mixed-precision policy instead, so autocast stays off (fp32)."""
        return "fp32" if self.scaling.strategy == "fsdp" else self.train.precision

    def to_dict(self) -> dict[str, Any]:
        """The plain, JSON-safe form that crosses into Ray (and into metadata.json)."""
        return self.model_dump(mode="json")
