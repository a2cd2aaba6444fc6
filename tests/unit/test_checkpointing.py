"""Snapshots into reused host memory, and checkpoint files on local and other filesystems."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import torch

from tests.payloads import Payload
from workers.checkpoint.integrity import damage, newest_intact
from workers.checkpoint.load import load_intact, load_metadata, load_train_state, load_weights
from workers.checkpoint.snapshot import HostBuffers, snapshot
from workers.checkpoint.state import ModelState
from workers.checkpoint.writer import write_checkpoint
from workers.contract.names import MODEL_FILE
from workers.contract.user_errors import UserInputError
from workers.loop.sharding import LocalState


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 2))


def test_buffers_are_reused_and_isolated_from_later_updates():
    m, buffers = model(), HostBuffers()
    first = buffers.copy(m.state_dict())
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # an optimizer step after the snapshot
    assert all(torch.equal(first.views[k], expected[k]) for k in expected)
    second = buffers.copy(m.state_dict())  # after the previous write: the same memory
    assert second is first
    assert all(torch.equal(second.views[k], v) for k, v in m.state_dict().items())


def test_model_checkpoints_leave_the_optimizer_state_out():
    m = model()
    optimizer = torch.optim.Adam(m.parameters())
    m(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    light = snapshot(m.state_dict(), None, {"epoch": 2}, {"epoch": 2}, buffers=HostBuffers())
    full = snapshot(m.state_dict(), optimizer.state_dict(), {"epoch": 2}, {"epoch": 2})
    assert "optimizer" not in light.train_state
    assert full.train_state["optimizer"]["state"][0]["exp_avg"].shape == (8, 4)


def test_ddp_state_reads_state_dicts_as_the_model_state_interface_says():
    m = model()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    state: ModelState = LocalState(m, optimizer)
    assert state.collective is False
    weights = state.weights()  # a state dict, as fsdp's ShardedState gives
    assert list(weights) == list(m.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in m.state_dict().items())
    assert state.optimizer_state() == optimizer.state_dict()
    kept = torch.optim.SGD(m.parameters(), lr=0.5)  # a custom loop's optimizer (ctx.keep)
    assert state.optimizer_state(kept)["param_groups"][0]["lr"] == 0.5
    assert LocalState(m, None).optimizer_state() is None


@pytest.mark.parametrize("filesystem", ["local", "subtree"])
def test_write_checkpoint_round_trip(tmp_path, filesystem):
    m = model()
    snap = snapshot(m.state_dict(), torch.optim.SGD(m.parameters(), lr=0.1).state_dict(),
                    {"epoch": 3}, {"epoch": 3, "val_loss": 0.5}, buffers=HostBuffers())
    if filesystem == "local":
        fs, path = pafs.LocalFileSystem(), str(tmp_path / "ckpt")
    else:  # not a LocalFileSystem: written as whole objects, as on an object store
        fs, path = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "ckpt"
    write_checkpoint(snap, fs, path)
    directory = tmp_path / "ckpt"
    assert sorted(p.name for p in directory.iterdir()) == [
        "metadata.json", MODEL_FILE, "train_state.pt"]  # no temp files left
    weights = load_weights(directory)
    assert all(torch.equal(weights[k], v) for k, v in m.state_dict().items())
    # The files' sizes and sha256 are recorded: what was written, byte for byte.
    digests = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name in (MODEL_FILE, "train_state.pt")
               for data in [(directory / name).read_bytes()]}
    assert load_metadata(directory) == {"epoch": 3, "val_loss": 0.5, "files": digests}
    assert load_train_state(directory)["epoch"] == 3


def test_damaged_files_are_named_and_the_newest_intact_checkpoint_is_chosen(tmp_path):
    m = model()
    for epoch in (2, 4, 6):
        snap = snapshot(m.state_dict(), None, {"epoch": epoch}, {"epoch": epoch},
                        buffers=HostBuffers())
        write_checkpoint(snap, pafs.LocalFileSystem(), str(tmp_path / f"ckpt{epoch}"))

    def check(name: str) -> str | None:
        directory = tmp_path / name
        return damage(load_metadata(directory), lambda f: (directory / f).read_bytes())

    names = [(epoch, f"ckpt{epoch}") for epoch in (2, 4, 6)]
    assert newest_intact(names, check) == ("ckpt6", [])
    model_file = tmp_path / "ckpt6" / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:-100])  # truncated, as by a full disk
    flipped = tmp_path / "ckpt4" / MODEL_FILE
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1  # the same size, one bit off
    flipped.write_bytes(bytes(data))
    chosen, damaged = newest_intact(names, check)
    assert chosen == "ckpt2"
    assert damaged == [f"ckpt6/{MODEL_FILE} has {len(model_file.read_bytes())} bytes, "
                       f"{len(model_file.read_bytes()) + 100} were written",
                       f"ckpt4/{MODEL_FILE} does not match its sha256"]
    (tmp_path / "ckpt2" / MODEL_FILE).unlink()
    assert newest_intact(names, check) == (None, [*damaged, f"ckpt2/{MODEL_FILE} is missing"])


def test_a_train_state_that_would_run_code_is_refused_unrun(tmp_path):
    m = model()
    snap = snapshot(m.state_dict(), torch.optim.SGD(m.parameters(), lr=0.1).state_dict(),
                    {"epoch": 3}, {"epoch": 3}, buffers=HostBuffers())
    write_checkpoint(snap, pafs.LocalFileSystem(), str(tmp_path / "ckpt"))
    marker = tmp_path / "payload-ran"
    state = tmp_path / "ckpt" / "train_state.pt"
    torch.save({"epoch": 3, "optimizer": Payload(marker)}, state)  # a real pickle, with code

    # Swapped in without its digest: the checkpoint is damaged, nothing is loaded from it.
    problem = damage(load_metadata(tmp_path / "ckpt"),
                     lambda f: (tmp_path / "ckpt" / f).read_bytes())
    assert problem is not None and problem.startswith("train_state.pt ")
    # And with its digest updated too: refused by the loader, one line, the payload unrun.
    metadata = load_metadata(tmp_path / "ckpt")
    data = state.read_bytes()
    metadata["files"]["train_state.pt"] = {"size": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "ckpt" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(UserInputError) as info:
        load_intact(SimpleNamespace(filesystem=pafs.LocalFileSystem(),
                                    path=str(tmp_path / "ckpt")))
    assert "train_state.pt: refused" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(pickle.UnpicklingError):
        load_train_state(tmp_path / "ckpt")
    assert not marker.exists(), "the payload ran"


def mixed_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "w": torch.randn(5, 3), "half": torch.randn(7).half(), "bf": torch.randn(3).bfloat16(),
        "steps": torch.tensor(11), "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8), "empty": torch.zeros(0, 4),
        "wide": torch.arange(3, dtype=torch.float64), "t": torch.randn(4, 6).t(),  # strided
    }


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_weights_image_is_a_safetensors_file(tmp_path, where):
    from safetensors.torch import load_file

    from workers.checkpoint.weights_image import WeightsImage

    tensors = mixed_tensors()
    image = WeightsImage(tensors)
    image.copy_from(tensors)
    if where == "tmpfs":  # refuses O_DIRECT: the ordinary write
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        path = tmp_path / "model.safetensors"
        image.write(path)
        assert path.stat().st_size == image.size
        assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
        loaded = load_file(str(path))
    finally:
        if where == "tmpfs":
            shutil.rmtree(tmp_path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_buffers_follow_a_model_that_changes_shape():
    buffers = HostBuffers()
    first = buffers.copy({"w": torch.ones(2, 2)})
    assert buffers.copy({"w": torch.zeros(2, 2)}) is first
    other = buffers.copy({"w": torch.ones(3)})
    assert other is not first and torch.equal(other.views["w"], torch.ones(3))
    assert buffers.copy({"w": torch.ones(2, dtype=torch.complex64)}) is None  # fresh copies
