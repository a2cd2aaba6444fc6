"""Print the config reference (Markdown) from the schema, ``workers.contract.config.RunConfig``.

Every section and field, with its dotted key, type or allowed values, default and the
description written next to it in the schema. ``make docs`` writes it to docs/config.md, and
``tests/unit/test_docs.py`` fails when that file and this output disagree. A field without a
description is an error here: the reference would have a hole.

    python scripts/config_reference.py              # print it
    python scripts/config_reference.py --out docs/config.md
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from any directory, with or without an install
    sys.path.insert(0, str(REPO))

from workers.contract.config import RunConfig  # noqa: E402

CONFIGS = REPO / "configs"
# The page each section's behaviour is explained on, relative to docs/.
SEE_ALSO = {
    "workload": "workloads.md",
    "scaling": "cluster.md",
    "tracker": "files.md",
    "checkpoint": "files.md",
    "failure": "faults.md",
    "wandb": "wandb.md",
    "tune": "search.md",
}
NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", Any: "any value"}


def type_text(annotation: Any) -> str:
    """A type as a reader says it: ``integer or list of integer``, ``one of `a`, `b` ``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_text(typing.get_args(annotation)[0])
    if origin is Literal:
        values = [f"`{v}`" for v in typing.get_args(annotation)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (Union, types.UnionType):
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(type_text(a) for a in parts)
        return text + (" or `null`" if len(parts) < len(typing.get_args(annotation)) else "")
    if origin is list:
        return f"list of {type_text(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    return NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds_text(info: FieldInfo) -> str:
    words = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("<=", "le"), annotated_types.Lt: ("<", "lt")}
    parts = []
    for item in info.metadata:
        if type(item) in words:
            sign, attr = words[type(item)]
            parts.append(f"{sign} {getattr(item, attr)}")
        elif isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            parts.append("not empty")
    return ", ".join(parts)


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def prose(text: str) -> str:
    """One paragraph of Markdown from a docstring or description (reST's ``x`` is `x`)."""
    return " ".join(text.split()).replace("``", "`")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def description(key: str, info: FieldInfo) -> str:
    if not info.description:
        raise SystemExit(f"workers/contract/config.py: {key} has no description; add "
                         "Field(description=...) so that the reference has no hole")
    return prose(info.description)


def docstring(model: type[BaseModel]) -> str:
    if not model.__doc__:
        raise SystemExit(f"workers/contract/config.py: {model.__name__} has no docstring")
    return prose(model.__doc__)


def is_section(info: FieldInfo) -> bool:
    return isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)


def table(prefix: str, model: type[BaseModel], fields: list[str]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name in fields:
        info = model.model_fields[name]
        key = f"{prefix}{name}"
        kind = type_text(info.annotation)
        bounds = bounds_text(info)
        kind = f"{kind}, {bounds}" if bounds else kind
        lines.append(f"| `{key}` | {cell(kind)} | {cell(default_text(info))} | "
                     f"{cell(description(key, info))} |")
    return lines


def every_default() -> str:
    cfg = RunConfig.model_validate({"workload": {"entrypoint": "mypackage.mymodule:build"}})
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()


def builtin_configs() -> list[str]:
    lines = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        head = []  # the comment the file opens with says what it is
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            head.append(line.lstrip("#").strip())
        what = " ".join(head)
        lines.append(f"- `{path.stem}` ([configs/{path.name}](../configs/{path.name})): {what}")
    return lines


def render() -> str:
    top = [n for n, f in RunConfig.model_fields.items() if not is_section(f)]
    sections = [n for n, f in RunConfig.model_fields.items() if is_section(f)]
    out = [
        "# Config reference",
        "",
        "Every key of the YAML config, generated from the typed schema in "
        "[workers/contract/config.py](../workers/contract/config.py) by "
        "`python scripts/config_reference.py` (`make docs`); do not edit this page by hand.",
        "",
        docstring(RunConfig),
        "",
        "A bad key or value is one line naming its dotted key, exit 2, before anything starts. "
        "`--set KEY=VALUE` overrides any key by its dotted path, the value read as YAML "
        "(`--set train.lr=0.01 --set workload.params.hidden=128`). What follows "
        "`tune.search_space.` is one key, dots and all "
        "(`--set 'tune.search_space.train.lr={loguniform: [0.001, 0.1]}'`); "
        "`workload.params` is split at every dot like the rest (its keys are keyword "
        "arguments, which have no dots, and a dotted path reaches into a nested mapping). "
        "A key given twice in one mapping of the file is refused, with both lines.",
        "",
        "Built-in configs (`orchestrator train NAME` runs one from any directory):",
        "",
        *builtin_configs(),
        "",
        "## Every default",
        "",
        "The config a file holding only `workload.entrypoint` gets:",
        "",
        "```yaml",
        every_default(),
        "```",
        "",
        "## Top level",
        "",
        *table("", RunConfig, top),
    ]
    for name in sections:
        model = RunConfig.model_fields[name].annotation
        out += ["", f"## `{name}`", "", docstring(model)]
        if name in SEE_ALSO:
            out[-1] += f" More: [{SEE_ALSO[name]}]({SEE_ALSO[name]})."
        out += ["", *table(f"{name}.", model, list(model.model_fields))]
        if name == "tracker":
            out += ["", *direction_table()]
    return "\n".join(out) + "\n"


def direction_table() -> list[str]:
    """``tracker.mode: auto``'s order of evidence and its table of name words, from
    ``workers/contract/direction.py`` itself."""
    from workers.contract.direction import HIGHER_IS_BETTER, LOWER_IS_BETTER

    return [
        "### Which way a metric improves (`tracker.mode: auto`)",
        "",
        "1. The direction the monitored metric's object declares: torchmetrics' "
        "`higher_is_better` (False for MeanSquaredError, Perplexity, KLDivergence, "
        "EditDistance, ...), or a `higher_is_better` attribute on a workload's own metric; the "
        "built-ins `accuracy`, `f1_macro` and `mcc` are better higher. (A fastai Learner's "
        "metrics declare none.)",
        "2. Else the monitor's name, split into whole words at `_`, `-`, `.` and case changes "
        "(`val_MeanSquaredError` -> val, mean, squared, error), looked up in this table; words "
        "of both kinds, or none, place nothing (`score` beside a minimised word defers to it):",
        "",
        "| better | words |",
        "|---|---|",
        f"| lower (`min`) | {', '.join(sorted(LOWER_IS_BETTER))} |",
        f"| higher (`max`) | {', '.join(sorted(HIGHER_IS_BETTER))} |",
        "",
        "3. Else the run is refused before anything starts (exit 2), naming `tracker.mode`: set "
        "`min` or `max`. The start line, `summary.json` (`mode`, `mode_source`) and every "
        "saved model's `metadata.json` say which direction was used and why; searches (Optuna, "
        "ASHA, PBT, the leaderboard) follow it.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the reference to this file")
    args = parser.parse_args(argv)
    text = render()
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
