"""A test workload that records its own weights at the end of every epoch, and makes each
checkpoint's write start only after training has moved on.

- The model counts its training steps, and on the first evaluation after training (the
  loop evaluates right after an epoch's last optimizer step, before it saves) saves a copy
  of its whole state dict with plain ``torch.save``: ``<record_dir>/epochNNNN-rankR.pt``.
  These copies are the truth the checkpoints are compared with; they do not go through the
  project's checkpoint code.
- ``build`` wraps ``workers.checkpoint.writer.write_checkpoint`` in this worker process (in a
  Ray actor only, never in a driver that builds the workload to check it): a write
  waits (up to ``max_delay_s``) until the model has begun its second training step since
  the epoch was recorded (so the first one's optimizer step has changed the weights), and
  notes the step counts in ``<record_dir>/writes.jsonl``. So the weights are being changed
  by training while their checkpoint is written; the write of ``last_epoch``, with no
  training after it, goes ahead at once. The delay is long (a loaded machine can take
  seconds between an epoch's report and its next step); it ends as soon as training moves on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

RETRY_WAIT_S = 300.0  # the longest a retried write waits for the next epoch to be recorded


class Recorded(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, record_dir: str) -> None:
        super().__init__()
        self.inner = inner
        self.record_dir = Path(record_dir)
        self.steps = 0  # training forwards in this process (one per optimizer step)
        self.epochs = 0
        self.steps_at_record: dict[int, int] = {}  # epoch -> training steps when it was recorded
        self._training_since_record = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            self._training_since_record = True
        elif self._training_since_record:  # the first evaluation after an epoch's training
            self._training_since_record = False
            self.epochs += 1
            self.steps_at_record[self.epochs] = self.steps
            rank = dist.get_rank() if dist.is_initialized() else 0
            state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            torch.save(state, self.record_dir / f"epoch{self.epochs:04d}-rank{rank}.pt")
        return self.inner(x)


def delay_writes(model: Recorded, max_delay_s: float, fail_first_write_of: list[int],
                 last_epoch: int | None) -> None:
    import workers.checkpoint.writer as checkpointing

    write = checkpointing.write_checkpoint
    attempts: dict[int, int] = {}

    def wait_for(done: Callable[[], bool], limit_s: float = max_delay_s) -> None:
        deadline = time.monotonic() + limit_s
        while not done() and time.monotonic() < deadline:
            time.sleep(0.002)

    def delayed(snap, fs, path):
        epoch = snap.metadata["epoch"]
        attempts[epoch] = attempt = attempts.get(epoch, 0) + 1
        if attempt > 1:  # Ray's retry: let training record the next epoch and snapshot it.
            # Not bounded by max_delay_s: the next epoch always comes (a failing epoch is not
            # the last), and a loaded machine can take longer than that to train one.
            wait_for(lambda: model.epochs > epoch, RETRY_WAIT_S)
            time.sleep(0.5)
        at_record = model.steps_at_record[epoch]
        if epoch != last_epoch:
            wait_for(lambda: model.steps >= at_record + 2)
        record = {"epoch": epoch, "attempt": attempt, "epochs_recorded": model.epochs,
                  "steps_at_record": at_record, "steps_at_write": model.steps, "t": time.time()}
        failing = epoch in fail_first_write_of and attempt == 1
        with open(model.record_dir / "writes.jsonl", "a") as f:
            f.write(json.dumps({**record, "failed": failing}) + "\n")
        if failing:  # a token Ray Train retries uploads on
            raise OSError(f"AWS Error NETWORK_CONNECTION during PutObject (injected by "
                          f"tests/workloads/recorded.py for epoch {epoch})")
        return write(snap, fs, path)

    checkpointing.write_checkpoint = delayed


def _in_a_ray_actor() -> bool:
    """Whether this process is a Ray actor (a Ray Train worker, or a Tune trial training in
    its own process). A driver that builds the workload to check it (a test calling
    ``run_training`` in its pytest process) must not keep the patched writer: later tests in
    that process would write through it."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def build(record_dir: str, n_train: int = 64, dim: int = 8, hidden: int = 32,
          max_delay_s: float = 30.0, fail_first_write_of: list[int] | None = None,
          last_epoch: int | None = None) -> SimpleNamespace:
    """``fail_first_write_of``: epochs whose first write fails as an object store's network
    error does (Ray Train retries it, while training goes on). ``last_epoch``: the run's
    last epoch, whose write does not wait for training that never comes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n_train, dim, generator=gen)
    y = (x.sum(dim=1) > 0).long()
    model = Recorded(torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, 2)), record_dir)
    if _in_a_ray_actor():  # not in a driver that builds the workload to check it
        delay_writes(model, max_delay_s, fail_first_write_of or [], last_epoch)
    data = torch.utils.data.TensorDataset(x, y)
    return SimpleNamespace(model=model, train_dataset=data, val_dataset=data,
                           loss_fn=torch.nn.functional.cross_entropy, metrics=["accuracy"])
