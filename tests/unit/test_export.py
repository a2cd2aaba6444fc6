"""``orchestrator export``: the best model of a run directory (made here without Ray, as the
project writes one) exported, loaded back as a user would, and checked on the whole validation
split; models that cannot be exported, or whose export disagrees, refused in one line with
nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.start.config_file import load_config

REPO = Path(__file__).resolve().parents[2]


def make_run(tmp_path: Path, entrypoint: str, params: dict, *, batch_size: int = 32,
             warm_up=None, name: str = "run") -> Path:
    """A finished run's directory: one best checkpoint of the workload's model (built as
    ``load_best`` builds it: the config's seed, then ``build``), ``summary.json`` naming it.
    ``warm_up(workload)`` changes the weights and buffers before they are saved."""
    import pyarrow.fs as pafs

    from workers.checkpoint.snapshot import snapshot
    from workers.checkpoint.writer import write_checkpoint
    from workers.loop.learner import build_workload

    cfg = load_config({"name": name, "storage_path": str(tmp_path),
                       "workload": {"entrypoint": entrypoint, "params": params},
                       "train": {"batch_size": batch_size}})
    torch.manual_seed(cfg.seed)
    workload = build_workload(entrypoint, params)
    if warm_up is not None:
        warm_up(workload)
    run_dir = tmp_path / name
    checkpoint = run_dir / "checkpoint_epoch0003_3"
    write_checkpoint(snapshot(workload.model.state_dict(), None, {"epoch": 3},
                              {"epoch": 3, "val_loss": 0.5, "monitor": "val_loss",
                               "mode": "min", "is_best": True, "saved_because": "best",
                               "config": cfg.to_dict()}),
                     pafs.LocalFileSystem(), str(checkpoint))
    (run_dir / "summary.json").write_text(json.dumps(
        {"monitor": "val_loss", "best_checkpoint": str(checkpoint)}))
    return run_dir


def train_mode_passes(workload) -> None:
    """BatchNorm's running statistics moved off their initial values by a few training-mode
    passes (dropout active meanwhile), as training leaves them."""
    from torch.utils.data import DataLoader

    workload.model.train()
    with torch.no_grad():
        for x, _ in DataLoader(workload.train_dataset, batch_size=8):
            workload.model(x * 3 + 1)


def recomputed_max_diff(run_dir: Path, fmt: str = "export") -> tuple[float, int]:
    """Independently of the project's check: the saved model (load_best) and the exported
    file, loaded as a user would, on every validation sample; (max abs diff, rows)."""
    from torch.utils.data import DataLoader

    from orchestrator import load_best

    best = load_best(run_dir)
    collate = getattr(best.workload, "collate_fn", None)
    loader = DataLoader(best.workload.val_dataset, batch_size=17, collate_fn=collate)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(run_dir / "export" / "model.onnx"))
        names = [i.name for i in session.get_inputs()]
    else:
        program = torch.export.load(str(run_dir / "export" / "model.pt2")).module()
    worst, rows = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            if isinstance(batch, dict):
                kwargs = {k: v for k, v in batch.items() if k != "labels"}
                expected = best.model(**kwargs).logits
                got = (program(**kwargs).logits if fmt != "onnx" else torch.from_numpy(
                    session.run(None, {n: kwargs[n].numpy() for n in names})[0]))
                rows += len(batch["labels"])
            else:
                x = batch[0]
                expected = best.model(x)
                got = (program(x) if fmt != "onnx" else
                       torch.from_numpy(session.run(None, {names[0]: x.numpy()})[0]))
                rows += len(x)
            worst = max(worst, float((expected - got).abs().max()))
    return worst, rows


def record_of(run_dir: Path, fmt: str = "export") -> dict:
    return json.loads((run_dir / "export" / f"{fmt}.json").read_text())


# -- models that export --------------------------------------------------------------------
def test_the_builtin_digits_mlp_exports_and_matches_on_the_whole_validation_split(tmp_path):
    from orchestrator import export

    run_dir = make_run(tmp_path, "workers.workloads.digits:build", {"hidden": 32})
    result = export(run_dir)
    record = record_of(run_dir)
    assert result.file == str(run_dir / "export" / "model.pt2")
    assert record["file"] == "export/model.pt2" and record["format"] == "export"
    assert record["source_checkpoint"] == str(run_dir / "checkpoint_epoch0003_3")
    import hashlib

    assert record["sha256"] == hashlib.sha256(Path(result.file).read_bytes()).hexdigest()
    assert record["rows"] == 360 and record["batches"] == 12  # 1797 * 0.2, batches of 32
    assert record["input_shape"] == {"input": ["batch", 64]} and record["dynamic_batch"]
    assert record["example_shape"] == {"input": [32, 64]}
    assert record["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    assert record["torch"] == torch.__version__
    worst, rows = recomputed_max_diff(run_dir)
    assert rows == 360 and worst <= 1e-4
    assert record["max_abs_diff"] == result.max_abs_diff <= 1e-4
    print(f"digits export: max abs diff {record['max_abs_diff']:.3g} (recomputed {worst:.3g})")


def test_a_batchnorm_and_dropout_model_exports_in_eval_mode(tmp_path):
    from orchestrator.api import export

    params = {"norm": True, "dropout": 0.5, "hidden": 32, "n_val": 101, "with_test": False}
    run_dir = make_run(tmp_path, "tests.workloads.overfit:build", params, batch_size=16,
                       warm_up=train_mode_passes)
    result = export(run_dir)
    record = record_of(run_dir)
    assert record["rows"] == 101 and record["batches"] == 7  # the last batch holds 5
    worst, rows = recomputed_max_diff(run_dir)
    assert rows == 101 and worst <= 1e-4 and result.max_abs_diff <= 1e-4
    print(f"batchnorm export: max abs diff {record['max_abs_diff']:.3g} "
          f"(recomputed {worst:.3g})")


def test_a_transformers_model_exports_with_keyword_inputs_and_a_dynamic_sequence(tmp_path):
    pytest.importorskip("transformers")
    from orchestrator import export

    run_dir = make_run(tmp_path, "tests.workloads.tiny_bert:build", {}, batch_size=16)
    export(run_dir)
    record = record_of(run_dir)
    assert set(record["input_shape"]) == {"input_ids", "attention_mask"}  # no labels
    assert record["input_shape"]["input_ids"][:1] == ["batch"]
    assert record["input_shape"]["input_ids"][1] == "dynamic"  # padded to each batch's longest
    assert record["rows"] == 101
    worst, rows = recomputed_max_diff(run_dir)
    assert rows == 101 and worst <= 1e-4 and record["max_abs_diff"] <= 1e-4
    print(f"tiny BERT export: max abs diff {record['max_abs_diff']:.3g} "
          f"(recomputed {worst:.3g})")


def test_onnx_of_the_digits_mlp_is_checked_with_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from orchestrator import export

    run_dir = make_run(tmp_path, "workers.workloads.digits:build", {"hidden": 32})
    result = export(run_dir, format="onnx")
    record = record_of(run_dir, "onnx")
    assert result.file.endswith("export/model.onnx") and record["file"] == "export/model.onnx"
    assert record["rows"] == 360 and record["dynamic_batch"]
    assert {"onnx", "onnxscript", "onnxruntime"} <= set(record)
    assert not (run_dir / "export" / "model.pt2").exists()
    worst, rows = recomputed_max_diff(run_dir, "onnx")
    assert rows == 360 and worst <= 1e-4 and record["max_abs_diff"] <= 1e-4
    print(f"digits onnx: max abs diff {record['max_abs_diff']:.3g} (recomputed {worst:.3g})")


def test_a_search_exports_its_best_model_into_its_own_directory(tmp_path):
    from orchestrator import export

    search = make_run(tmp_path, "tests.workloads.untraceable:build", {"kind": "plain"},
                      batch_size=16, name="search")
    (search / "summary.json").rename(search / "leaderboard.json")
    record = json.loads((search / "leaderboard.json").read_text())
    (search / "leaderboard.json").write_text(json.dumps(
        {"monitor": "val_loss", "best_model": record["best_checkpoint"]}))
    result = export(search)
    assert result.file == str(search / "export" / "model.pt2")
    assert record_of(search)["source_checkpoint"] == record["best_checkpoint"]
    assert record_of(search)["rows"] == 40


# -- what a re-export may replace -----------------------------------------------------------
def test_a_re_export_replaces_its_own_files_and_never_a_users(tmp_path):
    from orchestrator import export

    run_dir = make_run(tmp_path, "tests.workloads.untraceable:build", {"kind": "plain"},
                       batch_size=16)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "notes.txt").write_text("mine")
    export(run_dir)
    first = record_of(run_dir)
    export(run_dir)  # its own file: replaced
    assert record_of(run_dir)["sha256"] == first["sha256"]
    assert (run_dir / "export" / "notes.txt").read_text() == "mine"
    (run_dir / "export" / "model.pt2").write_bytes(b"the user's own file")
    with pytest.raises(UserError, match=r"model.pt2: exists and is not the export this tool "
                       r"recorded in .*export.json; move it away"):
        export(run_dir)
    assert (run_dir / "export" / "model.pt2").read_bytes() == b"the user's own file"


# -- refused in one line, nothing left behind ------------------------------------------------
def test_an_export_that_disagrees_with_the_model_is_refused_and_keeps_the_old_one(tmp_path):
    from orchestrator import export

    run_dir = make_run(tmp_path, "tests.workloads.untraceable:build", {"kind": "plain"},
                       batch_size=16)
    export(run_dir)
    kept = {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()}
    # Its best model is now one that multiplies by its call count: the trace bakes in 1, the
    # model goes on counting.
    other = make_run(tmp_path, "tests.workloads.untraceable:build", {"kind": "counter"},
                     batch_size=16, name="other")
    (run_dir / "summary.json").write_text((other / "summary.json").read_text())
    with pytest.raises(UserError, match=r"^export: refused: the exported model's outputs "
                       r"differ from the saved model's by up to .* beyond the tolerance "
                       r"\(atol 0.0001 \+ rtol 0.0001\); nothing was written$") as refused:
        export(run_dir)
    assert "\n" not in str(refused.value)
    assert {p.name: p.read_bytes() for p in (run_dir / "export").iterdir()} == kept


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_a_model_that_cannot_be_traced_is_one_line_naming_the_module(tmp_path):
    run_dir = make_run(tmp_path, "tests.workloads.untraceable:build", {"kind": "branch"},
                       batch_size=16)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    done = cli(str(run_dir))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: export: torch.export cannot trace model.1 (SignGate, "
                               "untraceable.py:21): GuardOnDataDependentSymNode: ")
    assert "torch.cond or torch.where" in lines[0]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_a_wrong_path_or_format_is_one_line(tmp_path):
    done = cli(str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no summary.json or leaderboard.json here; pass a "
        "finished run's or search's directory"]
    done = cli(str(tmp_path), "--format", "tflite")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'tflite'" in done.stderr


def test_onnx_without_its_packages_names_the_extra(monkeypatch):
    import importlib.util

    from orchestrator.results import export as export_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UserError, match=r"^export: --format onnx needs onnxscript: pip install "
                       r"'ray-best-model-orchestrator\[onnx\]'$"):
        export_module.check_format("onnx")
