"""Workloads shaped as users write them, each trained on 2 workers through the Python API (the
same run as ``orchestrator train``'s, on the module's one local Ray), each saved best
re-scored in this process, independently of the project's own evaluation code
(scikit-learn for the metrics), equal to the record for validation and test (1e-6).

- shapes: torchvision's ResNet-18 (BatchNorm) on PIL images, augmented, on loader workers;
- sequences: variable-length tokens, a padding collate function, mapping batches with the
  workload's own label key, and a loss_fn;
- tiny_bert: a transformers BERT from a tiny config, the model's own loss (loss_fn None), a
  torchmetrics AUROC (a mapping) monitored with mode max;
- regression: float targets, BatchNorm, torchmetrics R2 and mean absolute error in a list.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch.utils.data import DataLoader, default_collate

from orchestrator import load_best, train
from tests.integration.conftest import assert_close

pytestmark = pytest.mark.integration


def outputs(workload, dataset, batch_size: int = 16):
    """(per-sample losses' sum / n, logits (N, C), targets (N, ...)) in one process."""
    model = workload.model
    collate = getattr(workload, "collate_fn", None) or default_collate
    label_key = getattr(workload, "label_key", "labels")
    total, n, logits, targets = 0.0, 0, [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            if isinstance(batch, dict):
                target = batch[label_key]
                if workload.loss_fn is None:  # the model's own loss, labels in
                    out = model(**batch)
                    loss, out = out.loss, out.logits
                else:
                    out = model(**{k: v for k, v in batch.items() if k != label_key})
                    loss = workload.loss_fn(out, target)
            else:
                x, target = batch
                out = model(x)
                loss = workload.loss_fn(out, target)
            total += loss.double().item() * len(target)
            n += len(target)
            logits.append(out.double())
            targets.append(target)
    return total / n, torch.cat(logits), torch.cat(targets)


def sklearn_metrics(name: str, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(1).numpy()
    if name == "shapes":
        return {"accuracy": skm.accuracy_score(y, pred),
                "f1_macro": skm.f1_score(y, pred, average="macro")}
    if name == "sequences":
        return {"accuracy": skm.accuracy_score(y, pred), "mcc": skm.matthews_corrcoef(y, pred)}
    if name == "tiny_bert":
        return {"auroc": skm.roc_auc_score(y, torch.softmax(logits, 1)[:, 1].numpy())}
    yt, yp = y.numpy().ravel(), logits.numpy().ravel()
    return {"r2_score": skm.r2_score(yt, yp), "mean_absolute_error": float(np.abs(yt - yp).mean())}


CASES = {
    "shapes": ({"train": {"epochs": 3, "batch_size": 16, "lr": 0.003, "loader_workers": 2}},
               "val_loss"),
    "sequences": ({"train": {"epochs": 6, "batch_size": 16, "lr": 0.01}}, "val_loss"),
    "tiny_bert": ({"train": {"epochs": 4, "batch_size": 16, "lr": 0.002},
                   "tracker": {"monitor": "val_auroc", "mode": "max"}}, "val_auroc"),
    "regression": ({"train": {"epochs": 6, "batch_size": 16, "lr": 0.01}}, "val_loss"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_workload_as_users_write_it_trains_and_its_best_rescores(tmp_path: Path, ray_local,
                                                                   name: str):
    extra, monitor = CASES[name]
    cfg = {"name": name, "storage_path": str(tmp_path / "runs"),
           "workload": {"entrypoint": f"tests.workloads.{name}:build"},
           "scaling": {"num_workers": 2}, "wandb": {"mode": "disabled"}, **extra}
    assert train(cfg).status == "completed"
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    history = summary["history"]
    values = [h[monitor] for h in history]
    best_value = max(values) if monitor == "val_auroc" else min(values)
    assert summary["best_epoch"] == values.index(best_value) + 1
    assert summary["best_metrics"][monitor] == best_value

    best = load_best(tmp_path / "runs" / name)
    assert best.metadata["epoch"] == summary["best_epoch"]
    for split, record in (("val", summary["best_metrics"]), ("test", summary["test_metrics"])):
        dataset = getattr(best.workload, f"{split}_dataset")
        loss, logits, y = outputs(best.workload, dataset)
        assert_close(loss, record[f"{split}_loss"])
        for metric, value in sklearn_metrics(name, logits, y).items():
            # torchmetrics computes in float32, scikit-learn here in float64: 1e-5 covers
            # float32's rounding, and any sample counted twice or missed is far beyond it.
            assert_close(record[f"{split}_{metric}"], value, rel=1e-5)
