"""The pieces of ``orchestrator export`` that touch torch: a validation batch made the
exporter's example inputs (the batch dimension dynamic), the model traced by ``torch.export``
or to ONNX, the saved file run back, its outputs compared with the model's, and a model that
cannot be traced named in one line.

A batch is what the workload's loaders make (see ``workers.loop.batches``): an
``(input, target)`` pair, whose input is passed as the one positional argument, or a mapping,
passed as keyword arguments without the label key (an exported model predicts; a Hugging Face
model given no ``labels`` computes no loss).
"""

from __future__ import annotations

import contextlib
import io
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError
from workers.loop.batches import Batches, batch_size

# The check's tolerance, elementwise as torch.isclose: |exported - model| <= ATOL + RTOL*|model|.
# float32 kernels of a traced graph may fuse or reorder sums; 1e-4 leaves room for that and
# still catches a wrong weight, a missed buffer or a branch baked in (all far larger).
ATOL = 1e-4
RTOL = 1e-4

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) of one model call


@dataclass(frozen=True)
class BatchReader:
    """A validation batch as the model's (args, kwargs) and its number of rows: the
    workload's own batches (``Batches``: a pair's input, a mapping's keys but the label key),
    or a fastai Learner's (its ``n_inp`` inputs, then the target)."""

    batches: Batches
    n_inp: int | None = None  # a Learner's inputs per batch

    @classmethod
    def of(cls, workload: Any) -> BatchReader:
        learn = (getattr(workload, "extras", None) or {}).get("learner")
        return cls(Batches.of(workload), int(learn.dls.n_inp) if learn is not None else None)

    def inputs(self, batch: Any) -> Inputs:
        if self.n_inp is not None:
            return plain((tuple(batch[: self.n_inp]), {}))
        inputs, _ = self.batches.split(batch)
        if isinstance(inputs, Mapping):
            label = self.batches.label_key
            return plain(((), {str(k): v for k, v in inputs.items() if k != label}))
        return plain(((inputs,), {}))

    def rows(self, batch: Any) -> int:
        if self.n_inp is not None:
            return int(batch[self.n_inp].shape[0])
        return batch_size(self.batches.split(batch)[1])


def tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a nested output or input, in order (tensors, sequences, mappings, and
    Hugging Face's ModelOutput, a mapping of its set fields): the order ONNX flattens them."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def dynamic_shapes(inputs: Inputs) -> Any:
    """Every tensor's first dimension is the batch (``Dim.DYNAMIC``: export fails if the model
    fixes it); its other dimensions are ``Dim.AUTO``: dynamic where they may be (a sequence's
    length), fixed where the model fixes them (a Linear's features)."""
    from torch.export import Dim

    def spec(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.ndim == 0:
                return None
            return {0: Dim.DYNAMIC, **{i: Dim.AUTO for i in range(1, obj.ndim)}}
        if isinstance(obj, Mapping):
            return {k: spec(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(spec(v) for v in obj)
        return None

    args, kwargs = inputs  # one of them is empty (see ``model_inputs``)
    return spec(kwargs) if kwargs else spec(args)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export prints a failed trace's partial graph on stderr and onnx its progress on
    stdout: the command says what matters in one line."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def trace(model: torch.nn.Module, inputs: Inputs, fmt: str, out: Path) -> None:
    """Export ``model`` on ``inputs`` to ``out`` (a ``.pt2`` program or an ``.onnx`` file);
    a model that cannot be traced is one ``UserError`` naming the module and the cause."""
    args, kwargs = inputs
    shapes = dynamic_shapes(inputs)
    try:
        with quiet(), torch.no_grad():
            if fmt == "onnx":
                # external_data=False: one self-contained file (protobuf's 2 GB limit)
                torch.onnx.export(model, args, str(out), kwargs=kwargs, dynamic_shapes=shapes,
                                  dynamo=True, external_data=False, verbose=False)
            else:
                program = torch.export.export(model, args, kwargs=kwargs,
                                              dynamic_shapes=shapes)
                torch.export.save(program, str(out))
    except Exception as exc:  # noqa: BLE001 - whatever the tracer raised, named in one line
        raise UserError(untraceable(model, exc, fmt)) from None


def _root(exc: BaseException) -> BaseException:
    """The innermost cause: torch.onnx wraps torch.export's error in its own."""
    seen: set[int] = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _culprit(model: torch.nn.Module, exc: BaseException) -> str | None:
    """The innermost module of ``model`` whose ``forward`` was running when the tracer
    failed: ``gate (Gate, net.py:12)``, the path inside the model, its class and the line."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        if code.co_name != "forward" or not code.co_argcount:
            continue
        module = frame.f_locals.get(code.co_varnames[0])
        if isinstance(module, torch.nn.Module) and id(module) in names:
            where = f"{Path(code.co_filename).name}:{line}"
            found = (f"model.{names[id(module)]}" if names[id(module)] else "the model") + (
                f" ({type(module).__name__}, {where})")
    return found


def untraceable(model: torch.nn.Module, exc: BaseException, fmt: str) -> str:
    root = _root(exc)
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    first = f"{type(root).__name__}: {lines[0][:240] if lines else ''}"
    where = _culprit(model, root) or _culprit(model, exc) or type(model).__name__
    if "data-dependent" in first or "DataDependent" in first:
        hint = ("a branch or a shape that depends on a tensor's values cannot be exported: "
                "write it with torch.cond or torch.where")
    elif fmt == "onnx" and "torch.export" not in str(exc):
        hint = "its graph has no ONNX translation; try --format export (a torch.export program)"
    else:
        hint = ("see what torch.export supports: "
                "https://pytorch.org/docs/stable/generated/exportdb/index.html")
    tracer = "torch.onnx" if fmt == "onnx" else "torch.export"
    return f"export: {tracer} cannot trace {where}: {first}; {hint}"


@dataclass
class Comparison:
    """The check, over every batch compared so far."""

    max_abs_diff: float = 0.0
    within: bool = True
    batches: int = 0
    rows: int = 0
    worst_batch: int | None = field(default=None)

    def add(self, expected: list[torch.Tensor], got: list[torch.Tensor], rows: int) -> None:
        if len(expected) != len(got) or any(
                e.shape != g.shape for e, g in zip(expected, got, strict=True)):
            raise UserError(
                f"export: the exported model's outputs ({describe_all(got)}) differ in shape "
                f"from the model's ({describe_all(expected)}) on validation batch "
                f"{self.batches + 1}")
        for e, g in zip(expected, got, strict=True):
            e, g = e.detach().double(), g.detach().double()
            both_nan = e.isnan() & g.isnan()
            diff = torch.where(both_nan, torch.zeros_like(e), (e - g).abs())
            worst = float(diff.max()) if diff.numel() else 0.0
            if worst != worst or worst > self.max_abs_diff:  # NaN: one side only
                self.max_abs_diff, self.worst_batch = worst, self.batches + 1
            if not torch.isclose(g, e, rtol=RTOL, atol=ATOL, equal_nan=True).all():
                self.within = False
        self.batches += 1
        self.rows += rows


def compare(model: torch.nn.Module, loaded: Loaded, reader: BatchReader,
            stream: Iterable[Any]) -> Comparison:
    """The model and the exported file, side by side on every batch of ``stream``."""
    check = Comparison()
    with torch.no_grad():
        for number, batch in enumerate(stream, start=1):
            inputs = reader.inputs(batch)
            expected = tensors(model(*inputs[0], **inputs[1]))
            try:
                got = loaded.run(inputs)
            except Exception as exc:  # noqa: BLE001 - the exported file's runtime, named
                lines = str(exc).strip().splitlines()
                raise UserError(
                    f"export: the exported model fails on validation batch {number} "
                    f"({describe_all(tensors(inputs))}): {type(exc).__name__}: "
                    f"{lines[0][:200] if lines else ''}") from None
            check.add(expected, got, reader.rows(batch))
    return check


def describe_all(outputs: list[torch.Tensor]) -> str:
    return ", ".join(f"tensor{tuple(t.shape)}" for t in outputs)


def _dims(shape: Any) -> list[int | str]:
    """A traced input's shape for the record: sizes, ``"batch"`` for the first dimension
    when it is dynamic, ``"dynamic"`` for another dynamic one."""
    return [d if isinstance(d, int) else "batch" if i == 0 else "dynamic"
            for i, d in enumerate(shape)]


@dataclass(frozen=True)
class Loaded:
    """An exported file loaded back: ``run`` maps the model's inputs to its output tensors;
    ``input_shapes``: each traced input's shape, by name."""

    run: Callable[[Inputs], list[torch.Tensor]]
    input_shapes: dict[str, list[int | str]]


def load(fmt: str, path: Path, inputs: Inputs) -> Loaded:
    """The saved file, read back as a user would: onnxruntime, or ``torch.export.load``."""
    args, kwargs = inputs
    names = list(kwargs) if kwargs else [f"input{i}" if i else "input"
                                         for i in range(len(tensors(args)))]
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_names = [i.name for i in session.get_inputs()]

        def run_onnx(inputs: Inputs) -> list[torch.Tensor]:
            args, kwargs = inputs
            if kwargs and set(onnx_names) <= set(kwargs):  # by name: ONNX drops unused inputs
                feed = {n: kwargs[n].numpy() for n in onnx_names}
            else:
                feed = {n: t.numpy() for n, t in zip(onnx_names, tensors((args, kwargs)),
                                                  strict=False)}
            return [torch.from_numpy(o) for o in session.run(None, feed)]

        return Loaded(run_onnx, {i.name: _dims(i.shape) for i in session.get_inputs()})
    from torch.export.graph_signature import InputKind

    program = torch.export.load(str(path))
    nodes = {n.name: n for n in program.graph.nodes}
    user = [getattr(s.arg, "name", "") for s in program.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT]
    shapes = {name: _dims(nodes[node].meta["val"].shape)
              for name, node in zip(names, user, strict=False) if node in nodes}
    module = program.module()

    def run_program(inputs: Inputs) -> list[torch.Tensor]:
        args, kwargs = inputs
        return tensors(module(*args, **kwargs))

    return Loaded(run_program, shapes)


def plain(inputs: Inputs) -> Inputs:
    """Tensor subclasses (fastai's ``TensorBase``) as plain tensors, which the tracers take."""
    def unwrap(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.as_subclass(torch.Tensor) if type(obj) is not torch.Tensor else obj
        if isinstance(obj, Mapping):
            return {k: unwrap(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(unwrap(v) for v in obj)
        return obj

    args, kwargs = inputs
    return tuple(unwrap(a) for a in args), {k: unwrap(v) for k, v in kwargs.items()}


def example_shapes(inputs: Inputs) -> dict[str, list[int]]:
    """The example batch's tensors' shapes, named as ``Loaded.input_shapes`` names them."""
    args, kwargs = inputs
    if kwargs:
        return {k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    return {f"input{i}" if i else "input": list(t.shape) for i, t in enumerate(tensors(args))}
