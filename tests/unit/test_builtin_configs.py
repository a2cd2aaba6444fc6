"""The built-in configs ship inside the package, each one valid, and the CLI takes them by
name (``orchestrator train digits``) from any directory; paths work as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.errors import UserError
from orchestrator.start.config_file import builtin_configs, load_config, resolve_config

REPO = Path(__file__).resolve().parents[2]


def test_package_lists_the_repository_configs():
    shipped = builtin_configs()
    assert set(shipped) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert {"digits", "digits_fastai", "breast_cancer"} <= set(shipped)
    for name, path in shipped.items():  # one copy: the package's file is the repository's
        assert path.read_bytes() == (REPO / "configs" / f"{name}.yaml").read_bytes()


@pytest.mark.parametrize("name", sorted(builtin_configs()))
def test_each_builtin_config_validates(name):
    cfg = load_config(name)
    assert cfg == load_config(REPO / "configs" / f"{name}.yaml")


def test_a_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("digits") == builtin_configs()["digits"]
    assert load_config("digits", ["train.epochs=3"]).train.epochs == 3


def test_paths_win_over_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").write_text("name: mine\n")  # a file called digits is that file
    assert resolve_config("digits") == Path("digits")
    assert resolve_config("configs/digits.yaml") == Path("configs/digits.yaml")  # as given
    assert resolve_config("digits.yaml") == Path("digits.yaml")  # a suffix: a path, not a name


def test_unknown_name_is_one_line_naming_the_choices(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="digitz: no such config file, nor a built-in config"):
        resolve_config("digitz")
    assert main(["train", "digitz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: digitz:")
    assert all(name in err for name in builtin_configs())
    # A good name gets past the config file to the next check: the --set key.
    assert main(["train", "digits", "--set", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err
