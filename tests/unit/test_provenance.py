"""Provenance (workers/loop/provenance.py, orchestrator/training/provenance.py): the data's
fingerprint of items of every shape, git present, absent and dirty, the packages recorded,
and what a --resume says when the code or the data changed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from orchestrator.training.provenance import resume_changes
from workers.contract.names import SUMMARY_FILE
from workers.loop.provenance import (
    SAMPLE_SIZE,
    change_line,
    changes,
    code_fingerprint,
    data_fingerprint,
    git_state,
    map_fingerprint,
    package_versions,
    ray_dataset_fingerprint,
    sample_indices,
)


class Odd:
    """An item type the hasher does not know: hashed by its type only."""


def odd_items(scale: float = 1.0) -> list:
    return [
        (torch.arange(6, dtype=torch.float32).reshape(2, 3) * scale, 1),
        {"input_ids": torch.tensor([1, 2, 3]), "labels": np.int64(1)},
        (np.ones((2, 2), dtype=np.float16), "a label"),
        (torch.zeros(3, dtype=torch.bfloat16), torch.tensor(True)),
        [1.5, None, b"bytes", 3],
        (torch.tensor(2.0), Odd()),
    ]


def test_the_same_items_give_the_same_fingerprint_and_any_change_another():
    first = map_fingerprint(odd_items())
    assert first["kind"] == "map" and first["length"] == 6 and first["sample"] == 6
    assert len(first["sha256"]) == 64
    assert map_fingerprint(odd_items()) == first  # deterministic, across calls
    assert map_fingerprint(odd_items(scale=2.0))["sha256"] != first["sha256"]  # a value
    # dtype and shape are part of a tensor's hash, not only its bytes
    same_bytes = odd_items()
    same_bytes[0] = (torch.arange(6, dtype=torch.float32).reshape(3, 2), 1)
    assert map_fingerprint(same_bytes)["sha256"] != first["sha256"]
    assert map_fingerprint(odd_items()[:5])["sha256"] != first["sha256"]  # the length
    # an item of an unknown type is named: its contents never reach the hash
    assert "test_provenance.Odd" in first["note"]


def test_randomly_augmented_items_give_the_same_fingerprint_and_leave_the_rngs_alone():
    """A split that augments in ``__getitem__`` (torch, NumPy and Python random draws): the same
    fingerprint whatever the global random state before it (the run and its resume), and
    the caller's random sequences continue as if nothing had drawn from them."""
    import random

    from workers.loop.provenance import map_fingerprint

    class Augmented(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 50

        def __getitem__(self, i):
            noise = torch.rand(3) + float(np.random.rand()) + random.random()
            return torch.full((3,), float(i)) + noise, i % 2

    torch.manual_seed(1)
    first = map_fingerprint(Augmented())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    expected = (torch.rand(2), np.random.rand(), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    second = map_fingerprint(Augmented())
    assert first["sha256"] is not None and first == second
    after = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


def test_a_large_split_is_fingerprinted_from_a_fixed_sample():
    data = [torch.full((2,), float(i)) for i in range(1000)]
    fp = map_fingerprint(data)
    assert fp["sample"] == SAMPLE_SIZE and fp["length"] == 1000
    indices = sample_indices(1000)
    assert indices == sample_indices(1000) and len(set(indices)) == SAMPLE_SIZE
    changed_in = list(data)
    changed_in[indices[3]] = torch.full((2,), -1.0)
    assert map_fingerprint(changed_in)["sha256"] != fp["sha256"]
    outside = next(i for i in range(1000) if i not in indices)
    changed_out = list(data)
    changed_out[outside] = torch.full((2,), -1.0)
    # What the fixed sample does not hold is not seen (the price of not reading every item).
    assert map_fingerprint(changed_out)["sha256"] == fp["sha256"]


def test_a_stream_and_a_broken_split_get_null_with_the_reason():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1), 0

    class Broken:
        def __len__(self):
            return 3

        def __getitem__(self, index):
            raise OSError("disk gone")

    workload = types.SimpleNamespace(train_dataset=Stream(), val_dataset=Broken(),
                                     test_dataset=None)
    fp = data_fingerprint(workload)
    assert set(fp) == {"train", "val"}  # no test split: nothing recorded for it
    assert fp["train"]["kind"] == "iterable" and fp["train"]["sha256"] is None
    assert "IterableDataset" in fp["train"]["reason"]
    assert fp["val"]["sha256"] is None and "OSError" in fp["val"]["reason"]


def test_a_ray_datasets_files_are_recorded_without_reading_them(tmp_path):
    files = []
    for i, size in enumerate((10, 2000)):
        path = tmp_path / f"part-{i}.parquet"
        path.write_bytes(b"x" * size)
        files.append(str(path))

    class Schema:
        names = ["x", "label"]
        types = ["double", "int64"]

    class FakeDataset:  # what ray_dataset_fingerprint asks of a ray.data.Dataset
        def input_files(self):
            return list(reversed(files))

        def schema(self, fetch_if_missing=True):
            assert fetch_if_missing is False, "the schema must not trigger a read"
            return Schema()

    fp = ray_dataset_fingerprint(FakeDataset(), rows=42)
    assert [f["path"] for f in fp["files"]] == files
    assert [f["size"] for f in fp["files"]] == [10, 2000]
    assert all(f["mtime"] for f in fp["files"])
    assert fp["schema"] == {"x": "double", "label": "int64"} and fp["rows"] == 42
    assert ray_dataset_fingerprint(FakeDataset(), rows=None)["rows"] is None


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    *args], check=True, capture_output=True)


@pytest.fixture
def workload_module(tmp_path, monkeypatch):
    """A workload module, ``wl_prov_mod:build``, in its own folder on sys.path."""
    folder = tmp_path / "code"
    folder.mkdir()
    module = folder / "wl_prov_mod.py"
    module.write_text("def build():\n    return None\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "wl_prov_mod", raising=False)
    return module


def test_code_outside_a_repository_has_null_git_keys_and_its_modules_hash(workload_module):
    code = code_fingerprint("wl_prov_mod:build")
    assert code["git_commit"] is None and code["dirty"] is None and code["diff_sha256"] is None
    assert code["module_file"] == str(workload_module)
    import hashlib
    assert code["module_sha256"] == hashlib.sha256(workload_module.read_bytes()).hexdigest()
    assert code["project_version"]  # the installed project's own version


def test_git_clean_then_dirty(workload_module):
    repo = workload_module.parent
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    clean = code_fingerprint("wl_prov_mod:build")
    assert len(clean["git_commit"]) == 40 and clean["dirty"] is False
    assert clean["diff_sha256"] is None
    workload_module.write_text("def build():\n    return 1\n")
    dirty = git_state(str(repo))
    assert dirty["git_commit"] == clean["git_commit"] and dirty["dirty"] is True
    diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--no-ext-diff", "--binary"],
                          capture_output=True, check=True).stdout
    import hashlib
    assert dirty["diff_sha256"] == hashlib.sha256(diff).hexdigest()


def test_no_git_program_is_no_error(workload_module, monkeypatch):
    git(workload_module.parent, "init", "-q")
    monkeypatch.setenv("PATH", str(workload_module.parent))  # no git there
    code = code_fingerprint("wl_prov_mod:build")
    assert code["git_commit"] is None and code["module_sha256"]


def test_packages_name_the_stack_and_libraries_only_where_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    packages = package_versions(use_gpu=False)
    import importlib.metadata
    assert packages["torch"] == importlib.metadata.version("torch")
    assert packages["ray"] == importlib.metadata.version("ray")
    assert {"python", "torch", "ray", "wandb"} <= set(packages)
    assert "transformers" not in packages and "cuda" not in packages
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(__version__="9.9"))
    assert package_versions(use_gpu=False)["transformers"] is not None
    on_gpu = package_versions(use_gpu=True)
    assert on_gpu["cuda"] == torch.version.cuda and "gpu" in on_gpu


def test_nothing_from_the_environment_is_recorded(monkeypatch, workload_module):
    monkeypatch.setenv("WANDB_API_KEY", "secret-marker-123")
    record = {"code": code_fingerprint("wl_prov_mod:build"),
              "packages": package_versions(use_gpu=False),
              "data": data_fingerprint(types.SimpleNamespace(train_dataset=[1, 2]))}
    assert "secret-marker-123" not in json.dumps(record)


def provenance_of(module_sha: str, train_sha: str, commit: str = "c" * 40) -> dict:
    return {"code": {"git_commit": commit, "dirty": False, "diff_sha256": None,
                     "module_sha256": module_sha},
            "packages": {"torch": "2.14.1"},
            "data": {"train": {"kind": "map", "length": 10, "sha256": train_sha}}}


def test_changes_name_what_differs_in_code_and_data():
    before = provenance_of("a" * 64, "d" * 64)
    assert changes(before, before) == []
    assert changes(None, before) == []  # nothing recorded before: nothing to compare
    moved = provenance_of("b" * 64, "d" * 64)
    found = changes(before, moved)
    assert found == [{"what": "the workload's module", "before": "a" * 64, "after": "b" * 64}]
    line = change_line(found)
    assert line.startswith("resume: the workload's module changed since the run started")
    assert "aaaaaaaaaaaa… -> bbbbbbbbbbbb…" in line and line.endswith("; continuing")
    assert "\n" not in line
    data = changes(before, provenance_of("a" * 64, "e" * 64, commit="f" * 40))
    assert [c["what"] for c in data] == ["the git commit", "the train data"]
    # packages are not compared: a resume on another machine may have other builds
    other = provenance_of("a" * 64, "d" * 64)
    other["packages"] = {"torch": "9"}
    assert changes(before, other) == []


def test_a_resume_says_it_in_one_line_and_keeps_earlier_changes(tmp_path):
    earlier = [{"epoch": 2, "what": "the train data", "before": "x", "after": "y"}]
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(
        {"provenance": provenance_of("a" * 64, "d" * 64), "provenance_changes": earlier}))
    said: list[str] = []
    recorded = resume_changes(str(tmp_path), provenance_of("b" * 64, "d" * 64), 5, said.append)
    assert len(said) == 1 and "the workload's module changed" in said[0]
    assert recorded == [*earlier, {"epoch": 5, "what": "the workload's module",
                                   "before": "a" * 64, "after": "b" * 64}]
    said.clear()
    assert resume_changes(str(tmp_path), provenance_of("a" * 64, "d" * 64), 5,
                          said.append) == earlier
    assert said == []


def test_a_resume_without_a_summary_compares_with_the_newest_checkpoint(tmp_path):
    from tests.unit.run_files import write_checkpoint_dir

    write_checkpoint_dir(tmp_path, 1, 0.5, is_best=True,
                         provenance=provenance_of("a" * 64, "d" * 64))
    said: list[str] = []
    recorded = resume_changes(str(tmp_path), provenance_of("a" * 64, "0" * 64), 1, said.append)
    assert [c["what"] for c in recorded] == ["the train data"] and len(said) == 1


def test_module_source_is_found_for_a_module_not_yet_imported(tmp_path, monkeypatch):
    folder = tmp_path / "pkg_root"
    (folder / "wlpkg_prov").mkdir(parents=True)
    (folder / "wlpkg_prov" / "__init__.py").write_text("")
    source = folder / "wlpkg_prov" / "work.py"
    source.write_text(textwrap.dedent("""
        def build():
            return None
    """))
    monkeypatch.syspath_prepend(str(folder))
    code = code_fingerprint("wlpkg_prov.work:build")
    assert code["module_file"] == str(source) and code["module_sha256"]
    assert code_fingerprint("no_such_module_xyz:build")["module_sha256"] is None


def test_a_file_reads_folder_is_listed_as_ray_lists_it_without_reading(tmp_path):
    """Ray 2.60 lists a read's files only when it runs (``input_files()`` is empty before):
    the read's own paths, from its plan (``compat.listed_read_paths``), are listed here."""
    import pyarrow.fs as pafs

    folder = tmp_path / "train"
    folder.mkdir()
    for name, size in (("a.parquet", 5), ("b.parquet", 7), ("_SUCCESS", 0),
                       (".hidden.parquet", 1), ("notes.txt", 3)):
        (folder / name).write_bytes(b"x" * size)

    class ListFiles:  # the operator's fields that compat reads
        paths = [str(folder)]
        filesystem = pafs.LocalFileSystem()
        file_extensions = ["parquet"]

    plan = types.SimpleNamespace(dag=types.SimpleNamespace(post_order_iter=lambda: [ListFiles()]))
    dataset = types.SimpleNamespace(input_files=list, _logical_plan=plan,
                                    schema=lambda fetch_if_missing=True: None)
    fp = ray_dataset_fingerprint(dataset, rows=None)
    assert [(Path(f["path"]).name, f["size"]) for f in fp["files"]] == [("a.parquet", 5),
                                                                      ("b.parquet", 7)]
    assert fp["rows"] is None and fp["schema"] is None and "not read twice" in fp["note"]
