"""Loading the run config: YAML file (or built-in config name) + ``--set key=value`` overrides
-> a validated RunConfig.

Every problem becomes a ``UserError`` whose message is one line naming the field (or file)
and what would be valid; the CLI prints it and exits 2 before anything is started or written.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import UserError
from workers.contract.config import RunConfig


class DuplicateKeyError(yaml.YAMLError):
    """The same key twice in one mapping (PyYAML would keep the last one silently)."""

    def __init__(self, key: str, first_line: int, line: int) -> None:
        where = f"on line {line}" if line == first_line else f"lines {first_line} and {line}"
        super().__init__(f"{key} given twice ({where})")
        self.key, self.first_line, self.line = key, first_line, line


def _refuse_duplicates(node: yaml.Node, path: tuple[str, ...] = (),
                       seen: set[int] | None = None) -> None:
    """Raise ``DuplicateKeyError`` for the first key given twice in a mapping, anywhere in
    ``node``, with its dotted path. Merge keys (``<<``) are not duplicates: an explicit key
    overrides a merged one, as YAML says."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                if (key_node.tag, key_node.value) in lines:
                    raise DuplicateKeyError(".".join((*path, name)),
                                            lines[key_node.tag, key_node.value], line)
                lines[key_node.tag, key_node.value] = line
            _refuse_duplicates(value_node, (*path, name), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",),
                               seen)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-3`` as a string, users mean a number.
    A key given twice in a mapping is refused (``DuplicateKeyError``), not the last kept."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node)
        return self.construct_document(node)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


# Keys of this mapping are dotted config keys themselves: what follows it is one key.
# (workload.params is split at every dot: its keys are keyword arguments, which have none,
# and a dotted path reaches into a nested mapping, as in tune.search_space.)
_SEARCH_SPACE = "tune.search_space."


def split_key(item: str, key: str) -> list[str]:
    """A dotted ``--set`` key as a path of sections: ``tune.search_space.train.lr`` is
    ``["tune", "search_space", "train.lr"]``."""
    key = key.strip()
    if any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: {key!r} has an empty part; use dotted names "
                        "like train.lr")
    if key.startswith(_SEARCH_SPACE):
        return [*_SEARCH_SPACE.split(".")[:2], key.removeprefix(_SEARCH_SPACE)]
    return key.split(".")


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.01")
    path = split_key(item, key)
    try:
        value = yaml_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # not YAML: keep it as the literal string
    return path, value


Overrides = Sequence[str] | Mapping[str, Any]


def override_items(overrides: Overrides) -> list[tuple[str, list[str], Any]]:
    """(as the user wrote it, dotted path, value): ``KEY=VALUE`` strings (the value read as
    YAML, as ``--set`` does) or a mapping of dotted keys to values (taken as they are)."""
    if isinstance(overrides, Mapping):
        items = []
        for key, value in overrides.items():
            path, _ = parse_override(f"{key}=")  # the same checks and split of the key
            items.append((f"{key}={value!r}", path, value))
        return items
    if isinstance(overrides, str):
        overrides = [overrides]
    return [(item, *parse_override(item)) for item in overrides]


def apply_overrides(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item, path, value in override_items(overrides):
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise UserError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


# pydantic appends the union member it tried ("bool", "literal['auto']") to an error's path.
_UNION_MEMBER = re.compile(r"^(bool|int|float|str|none|literal\[.*\]|function-.*)$")


def format_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    while loc and _UNION_MEMBER.match(loc[-1]):
        loc.pop()
    where = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see docs/config.md)"
    elif first["type"] == "missing":
        message = "required"
    elif "input" in first and first["type"] not in ("value_error",):
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if not where or message.startswith(f"{where}."):  # a section's check names its own key
        return f"{message}{suffix}"
    return f"{where}: {message}{suffix}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config file ({type(exc).__name__})") from None
    try:
        data = yaml_load(text)
    except DuplicateKeyError as exc:
        raise UserError(f"{path}: {exc}; YAML would keep only the last: keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def builtin_configs() -> dict[str, Path]:
    """The configs shipped in the package, by name (``digits`` for ``digits.yaml``).

    ``orchestrator/configs`` is a link to the repository's ``configs/``: one copy of each file,
    which a wheel (``pip install .``) holds as real files.
    """
    root = Path(str(resources.files("orchestrator") / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def resolve_config(arg: str | Path) -> Path:
    """A path that exists is read as given; a bare name (no folder, no suffix) is a built-in
    config, so ``orchestrator train digits`` works from any directory after any install."""
    path = Path(arg)
    if path.exists() or len(path.parts) != 1 or path.suffix:
        return path
    builtins = builtin_configs()
    if str(arg) in builtins:
        return builtins[str(arg)]
    raise UserError(f"{arg}: no such config file, nor a built-in config (built-in configs: "
                    f"{', '.join(builtins) or 'none'})")


def ensure_cwd_importable() -> None:
    """A user's workload module next to where they run the command must import."""
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_config(source: str | Path | Mapping[str, Any] | RunConfig,
                overrides: Overrides | None = None) -> RunConfig:
    """A validated config from a YAML file (or a built-in config's name), a mapping of config
    keys, or a ``RunConfig``, with ``overrides`` applied; every mistake a one-line
    ``UserError`` naming the field."""
    if isinstance(source, RunConfig):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml(resolve_config(source))
    data = apply_overrides(data, overrides or [])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None
    ensure_cwd_importable()
    # Here, not at the top: importing it imports torch (1.5 s), which a config that is
    # already wrong should not wait for.
    from workers.contract.workload import WorkloadError, check_params

    try:
        check_params(cfg.workload.entrypoint, cfg.workload.params)
    except WorkloadError as exc:
        raise UserError(str(exc)) from None
    return cfg
