"""Several checkpoints per call: the checkpoints a command's arguments name, and each one's result.

Read-only work (`inspect_each`, `check_each`, `verify_each`) yields one `Outcome` per checkpoint: its
result, or the error that stopped it; a failure in one never stops the others. Editing plans every
checkpoint and checks every destination (`plan_edits`) before writing any (`write_edits`). A source
is a local path or a URL (`remote`); `edit_source` is `apply.edit_checkpoint` for either.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

from lstm_surgeon import inspection
from lstm_surgeon.apply import Destination, Planner, WriteResult, edit_checkpoint
from lstm_surgeon.check import CheckReport, check_checkpoint
from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import CheckpointError, EditError, OutputError, SurgeonError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.inspection import Inspection
from lstm_surgeon.plan import EditPlan
from lstm_surgeon.remote import RemoteLocation, is_url, local_copy, remote_size
from lstm_surgeon.renames import RenameRule, rename_hint, renamed
from lstm_surgeon.writing import Progress, check_output_path

T = TypeVar("T")
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One checkpoint's result, or the error that stopped it (exactly one of the two is set)."""

    source: str
    value: T | None = None
    error: SurgeonError | None = None


def expand_sources(arguments: Sequence[str]) -> list[str]:
    """The checkpoints the arguments name, in order: a URL or a plain path as given (a missing file
    is that file's error, reported when it is opened), a glob's matches sorted (`**` included).
    A glob that matches nothing is an error: a typo should not pass as an empty run."""
    sources: list[str] = []
    for argument in arguments:
        if is_url(argument) or not GLOB_CHARACTERS & set(argument):
            sources.append(argument)
            continue
        matches = sorted(glob.glob(argument, recursive=True))
        if not matches:
            raise CheckpointError(f"{argument}: no file matches this pattern")
        sources.extend(matches)
    if not sources:
        raise CheckpointError("no checkpoint given")
    return sources


def each_checkpoint(sources: Iterable[str], work: Callable[[str], T]) -> Iterator[Outcome[T]]:
    """`work(source)` for every source in turn, an error in one reported as its outcome."""
    for source in sources:
        try:
            yield Outcome(source, value=work(source))
        except SurgeonError as error:
            yield Outcome(source, error=error)


def total_bytes(sources: Iterable[str]) -> int:
    """The bytes of every source together (a progress bar's total; what cannot be sized counts 0)."""
    return sum(_size(source) for source in sources)


def _size(source: str) -> int:
    if is_url(source):
        return remote_size(source)
    try:
        return os.stat(source).st_size
    except OSError:
        return 0


def inspect_each(
    sources: Iterable[str],
    layer_globs: Sequence[str] = (),
    histograms: bool = False,
    renames: Sequence[RenameRule] = (),
) -> Iterator[Outcome[Inspection]]:
    def inspect_one(source: str) -> Inspection:
        with open_checkpoint(source) as checkpoint:
            view = renamed(checkpoint, renames)
            report = inspection.inspect_checkpoint(view, layer_globs, histograms=histograms)
            hint = None if report.layers else rename_hint(view, discover(view))
            return report if hint is None else replace(report, hints=(hint,))

    return each_checkpoint(sources, inspect_one)


def check_each(
    sources: Iterable[str], progress: Progress | None = None, renames: Sequence[RenameRule] = ()
) -> Iterator[Outcome[CheckReport]]:
    return each_checkpoint(
        sources, lambda source: check_checkpoint(_location(source), progress, renames)
    )


def verify_each(
    sources: Iterable[str],
    layer_globs: Sequence[str] = (),
    renames: Sequence[RenameRule] = (),
    recurrent_activation: str | None = None,
) -> Iterator[Outcome]:
    """`verify` of each checkpoint; `recurrent_activation` says what a Keras file without a model
    config does not (`formats.keras_weights.assume_recurrent_activation`)."""
    from lstm_surgeon.verify import verify_checkpoint  # imports torch: only when verifying

    def verify_one(source: str) -> object:
        with open_checkpoint(source) as checkpoint:
            if recurrent_activation is not None:
                from lstm_surgeon.formats.keras_weights import assume_recurrent_activation

                assume_recurrent_activation(checkpoint, recurrent_activation)
            return verify_checkpoint(renamed(checkpoint, renames), layer_globs)

    return each_checkpoint(sources, verify_one)


def _location(source: str) -> Path:
    return RemoteLocation(source) if is_url(source) else Path(source)  # type: ignore[return-value]


def edit_source(
    source: str,
    planner: Planner,
    destination: Destination | None,
    before_write: Callable[[EditPlan], bool] = lambda plan: True,
    progress: Progress | None = None,
) -> tuple[EditPlan, WriteResult | None]:
    """`apply.edit_checkpoint` for a local path or a URL. A URL is planned where it lies (range
    reads: a dry run fetches only what the plan needs); to write, it is downloaded beside the
    output first (the output holds every byte anyway) and edited from there."""
    if not is_url(source):
        return edit_checkpoint(Path(source), planner, destination, before_write, progress)
    if destination is None:
        with open_checkpoint(source) as checkpoint:
            return planner(checkpoint), None
    if destination.output is None:
        raise EditError(f"{source}: a URL cannot be edited in place; write the result with -o PATH")
    _check_output(source, destination.output, destination.force)  # before a long download

    def planner_of_copy(checkpoint: Checkpoint) -> EditPlan:
        plan = planner(checkpoint)
        plan.source = RemoteLocation(source)  # the URL the user gave, not the temporary copy
        return plan

    with local_copy(source, destination.output.parent, progress) as local:
        return edit_checkpoint(local, planner_of_copy, destination, before_write)


def output_paths(sources: Sequence[str], folder: Path) -> dict[str, Path]:
    """Where `-o FOLDER` writes each source: named like the input, below the inputs' common folder
    (`runs/a/last.ckpt`, `runs/b/last.ckpt` -> `FOLDER/a/last.ckpt`, `FOLDER/b/last.ckpt`), so
    two inputs of one name never write one output."""
    local = [os.path.abspath(source) for source in sources if not is_url(source)]
    common = os.path.commonpath([os.path.dirname(path) for path in local]) if local else ""
    outputs: dict[str, Path] = {}
    for source in sources:
        if is_url(source):
            relative = Path(RemoteLocation(source).name)
        else:
            relative = Path(os.path.relpath(os.path.abspath(source), common))
        output = folder / relative
        if output in outputs.values():
            raise OutputError(f"{source}: another input is also written to {output}")
        outputs[source] = output
    return outputs


def plan_edits(
    sources: Sequence[str], planner: Planner, destinations: dict[str, Destination] | None
) -> list[Outcome[EditPlan]]:
    """Every checkpoint planned (reading only) and its destination checked, before any is written:
    an edit of many files either finds every problem first or writes."""

    def plan_one(source: str) -> EditPlan:
        if destinations is not None:
            _check_destination(source, destinations[source])
        plan, _ = edit_source(source, planner, None)
        return plan

    return list(each_checkpoint(sources, plan_one))


def _check_destination(source: str, destination: Destination) -> None:
    if destination.output is None:
        if is_url(source):
            raise EditError(f"{source}: a URL cannot be edited in place; write it with -o FOLDER")
        return
    if destination.output.parent.is_dir():  # else `write_edits` makes it: no file to overwrite
        _check_output(source, destination.output, destination.force)


def _check_output(source: str, output: Path, force: bool) -> None:
    """`writing.check_output_path`, which also refuses the input itself as the output; a URL never
    is that file, so the output's own folder (never equal to a file) stands in for it."""
    check_output_path(output, output.parent if is_url(source) else Path(source), force)


def write_edits(
    sources: Sequence[str],
    planner: Planner,
    destinations: dict[str, Destination],
    progress: Progress | None = None,
) -> Iterator[Outcome[tuple[EditPlan, WriteResult | None]]]:
    """Write each planned edit (after `plan_edits` found no problem); one that fails now (a file
    locked or changed meanwhile) is reported, and the others are still written."""

    def write_one(source: str) -> tuple[EditPlan, WriteResult | None]:
        destination = destinations[source]
        if destination.output is not None:
            destination.output.parent.mkdir(parents=True, exist_ok=True)
        return edit_source(source, planner, destination, progress=progress)

    return each_checkpoint(sources, write_one)
