"""The `lstm-surgeon` command: parses options, calls the library, renders. No logic lives here.

Errors from the library (`SurgeonError`) become one line on stderr and an exit code, in one place
(`_command`); `--debug` (or LSTM_SURGEON_DEBUG=1) shows the traceback instead. Under `--json` every
failure, option-parsing errors included, also prints `{"error": {"message", "exit_code"}}` on stdout.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer._click.exceptions import UsageError  # typer bundles click and names it nowhere public
from typer.core import TyperGroup

from lstm_surgeon import __version__
from lstm_surgeon.errors import EditError, Interrupted, OutputError, SurgeonError
from lstm_surgeon.vocabulary import Direction, Mode, RecurrentActivation

F = TypeVar("F", bound=Callable[..., Any])
INTERNAL_ERROR = 3
JSON_REQUESTED = "lstm_surgeon.json"  # key in click's ctx.meta: --json was on the command line


def _asks_for_json(args: list[str]) -> bool:
    """Whether the raw arguments hold `--json` as an option (not after `--`), read before parsing so
    that a parsing error can still be reported as JSON."""
    options = args[: args.index("--")] if "--" in args else args
    return "--json" in options


@contextlib.contextmanager
def _usage_errors_as_json(ctx: typer.Context) -> Iterator[None]:
    """Under --json, an option-parsing error also prints the JSON error object on stdout; typer
    still prints its usage message on stderr and exits 2."""
    try:
        yield
    except UsageError as error:
        if ctx.meta.get(JSON_REQUESTED):
            _output(json_mode=True).error_document(error.format_message(), error.exit_code)
        raise


class SurgeonGroup(TyperGroup):
    """The `lstm-surgeon` command group: typer's, plus JSON error objects for parsing errors."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[JSON_REQUESTED] = _asks_for_json(args)
        with _usage_errors_as_json(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        with _usage_errors_as_json(ctx):
            return super().invoke(ctx)


app = typer.Typer(
    name="lstm-surgeon",
    help="Inspect and edit the LSTM, GRU and RNN layers inside saved models (PyTorch, ONNX, "
    "Keras, numpy; single files, sharded or distributed folders, URLs), without the training code.",
    no_args_is_help=True,
    cls=SurgeonGroup,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich-formatted help costs ~100 ms per call
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = {"on": os.environ.get("LSTM_SURGEON_DEBUG", "") not in ("", "0")}

# Options shared by several commands, defined once.
CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="CHECKPOINT",
        help="A checkpoint file (.pt, .safetensors, TorchScript, ONNX, numpy, ...) or a folder: "
        "sharded (index.json) or DCP.",
    ),
]
CheckpointsArg = Annotated[
    list[str],
    typer.Argument(
        metavar="CHECKPOINT...",
        help="A .pt (torch.save) or .safetensors file, several, a quoted glob ('runs/*/last.ckpt'), "
        "or a URL (https://, hf://, any installed fsspec protocol).",
        show_default=False,
    ),
]
LayerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        "-l",
        metavar="GLOB",
        help="Only layers whose name matches this glob (repeatable).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout and nothing else.")]
RenameOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rename",
        metavar="REGEX=REPLACEMENT",
        help="Read tensor names as renamed (Python re.sub, split at the last '='; repeatable), "
        r"e.g. '^(rnn\d)_w_(ih|hh)$=\1.weight_\2'. Edits still write the real tensors.",
    ),
]
HistOpt = Annotated[
    bool,
    typer.Option(
        "--hist", help="Add a histogram of each gate's per-unit bias (one range per table)."
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="PATH",
        help="Write the result here (suffix picks the format); with several checkpoints, a folder "
        "(outputs named like the inputs).",
    ),
]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Edit the checkpoint itself.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan; write nothing.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before writing.")]
BackupOpt = Annotated[bool, typer.Option("--backup", help="With --in-place: keep FILE.bak.")]
FsyncOpt = Annotated[
    bool,
    typer.Option(
        "--fsync", help="Make a -o output durable against power loss (in-place always is)."
    ),
]
SublayerOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--sublayer", metavar="K", help="Only this sub-layer index of stacked layers (repeatable)."
    ),
]
DirectionOpt = Annotated[
    Direction | None,
    typer.Option("--direction", help="Only this direction of bidirectional layers."),
]
RecurrentActivationOpt = Annotated[
    RecurrentActivation | None,
    typer.Option(
        "--recurrent-activation",
        help="Keras files without a model config: the gates' activation to assume "
        "(hard_sigmoid before Keras 2.3, else sigmoid).",
    ),
]
ModeOpt = Annotated[
    Mode,
    typer.Option(
        "--mode",
        help="How V reaches the gate: effective (b_ih=V, b_hh=0), both (b_ih=b_hh=V: the gate "
        "sees 2V), ih, hh, add (b_ih += V).",
    ),
]
DropOptimizerOpt = Annotated[
    bool,
    typer.Option("--drop-optimizer-state", help="Remove optimizer state that no longer matches."),
]


def _output(json_mode: bool = False, json_lines: bool = False) -> Any:
    """The output sink (rich is imported only when a command runs, not for --help)."""
    from lstm_surgeon.output import Output

    return Output(json_mode, json_lines)


def _report_each(
    arguments: list[str],
    json_mode: bool,
    run: Callable[[list[str], Any], Iterator[Any]],
    show: Callable[[Any, Any], int],
) -> None:
    """Run a read-only command over every checkpoint the arguments name and show each result
    (`show` returns its exit code). One checkpoint reports exactly as it always has; among
    several, --json prints one object per line, and a failed checkpoint is reported (its error
    object names it) without stopping the others; the exit code is the worst one seen."""
    from lstm_surgeon.batch import expand_sources

    sources = expand_sources(arguments)
    several = len(sources) > 1
    out = _output(json_mode, json_lines=several)
    worst = 0
    for outcome in run(sources, out):
        if outcome.error is not None and not several:
            raise outcome.error
        if outcome.error is not None:
            out.error(str(outcome.error), outcome.error.exit_code, outcome.source)
            worst = max(worst, outcome.error.exit_code)
        else:
            worst = max(worst, show(out, outcome.value))
    if worst:
        raise typer.Exit(worst)


def _command(function: F) -> F:
    """Turn library errors and Ctrl-C into one stderr line and an exit code (and, under --json, the
    JSON error object on stdout, so a script that parses stdout always gets one object)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return function(*args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted("interrupted") from None
        except SurgeonError as error:
            if _debug["on"]:
                raise
            _fail(str(error), error.exit_code, kwargs.get("json", False))
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:
            if _debug["on"]:
                raise
            message = (
                f"internal error ({type(error).__name__}: {error}); rerun with --debug to see where"
            )
            _fail(message, INTERNAL_ERROR, kwargs.get("json", False))

    return wrapper  # type: ignore[return-value]


def _fail(message: str, exit_code: int, json_mode: bool) -> NoReturn:
    """Report a failure through the output sink and end the command with `exit_code`."""
    _output(json_mode).error(message, exit_code)
    raise typer.Exit(exit_code) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lstm-surgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("LSTM_SURGEON_DEBUG", "") not in ("", "0")


@app.command()
@_command
def inspect(
    checkpoints: CheckpointsArg,
    layer: LayerOpt = None,
    hist: HistOpt = False,
    rename: RenameOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show every recurrent layer with its gate-sliced biases.

    Example:

    \b
    lstm-surgeon inspect model.pt --layer 'encoder*' --hist
    lstm-surgeon inspect 'runs/*/last.ckpt' --json
    lstm-surgeon inspect https://example.com/model.safetensors
    """
    from lstm_surgeon.batch import inspect_each
    from lstm_surgeon.renames import parse_renames
    from lstm_surgeon.render import inspection_view

    def show(out: Any, inspection: Any) -> int:
        for warning in inspection.warnings:
            out.warn(warning)
        for hint in inspection.hints:
            out.note(hint)
        out.show(inspection_view(inspection))
        out.data(inspection.to_dict())
        return 0

    rules = parse_renames(rename or ())
    _report_each(
        checkpoints,
        json,
        lambda sources, out: inspect_each(sources, layer or (), hist, rules),
        show,
    )


@dataclass(frozen=True, kw_only=True)
class EditOptions:
    """The options every editing command shares (each command declares them with the aliases above,
    in this order, and passes them on as one record)."""

    output: Path | None
    in_place: bool
    force: bool
    dry_run: bool
    yes: bool
    json: bool
    backup: bool
    fsync: bool
    rename: list[str] | None = None

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> EditOptions:
        """The shared options out of a command's arguments (its `locals()`), by name: declared once
        here instead of copied into every editing command."""
        return cls(**{option.name: arguments[option.name] for option in fields(cls)})


def _selection(
    layer: list[str] | None, sublayer: list[int] | None = None, direction: Direction | None = None
) -> Any:
    from lstm_surgeon.surgery import Selection

    return Selection(tuple(layer or ()), tuple(sublayer or ()), (direction,) if direction else ())


def _edit(arguments: list[str], planner: Callable[[Any], Any], options: EditOptions) -> None:
    """Plan, preview, confirm and write (the flow every editing command shares): one checkpoint,
    or several (`-o FOLDER` or `--in-place`), every one planned before any is written."""
    from lstm_surgeon.batch import expand_sources
    from lstm_surgeon.renames import parse_renames, with_renames

    sources = expand_sources(arguments)
    planner = with_renames(planner, parse_renames(options.rename or ()))
    into_folder = options.output is not None and options.output.is_dir()
    if len(sources) == 1 and not into_folder:
        _edit_one(sources[0], planner, options)
    else:
        _edit_many(sources, planner, options)


def _show_plan(out: Any, plan: Any) -> None:
    from lstm_surgeon.render import plan_view

    for skipped in plan.skipped:
        out.note(f"skipped {skipped}")
    for note in plan.notes:
        out.warn(note)
    out.show(plan_view(plan))


def _edit_one(source: str, planner: Callable[[Any], Any], options: EditOptions) -> None:
    from lstm_surgeon.apply import Destination
    from lstm_surgeon.batch import edit_source, total_bytes
    from lstm_surgeon.render import result_line

    out = _output(options.json)
    destination = None
    if not options.dry_run:
        destination = Destination(
            options.output, options.in_place, options.force, options.backup, options.fsync
        )

    def preview(plan: Any) -> bool:
        _show_plan(out, plan)
        return _confirmed(options, [plan], str(options.output))

    with out.progress("copying", total_bytes([source])) as progress:
        plan, result = edit_source(source, planner, destination, preview, progress)
    if options.dry_run:
        preview(plan)
        out.note("dry run: nothing written")
    elif result is not None:
        out.show(result_line(result))
    out.data(_edit_document(options, plan, result))
    if destination is not None and result is None:
        out.note("nothing written")
        raise typer.Exit(1)


def _edit_document(options: EditOptions, plan: Any, result: Any) -> dict[str, Any]:
    return {
        "dry_run": options.dry_run,
        "plan": plan.to_dict(),
        "result": None if result is None else result.to_dict(),
    }


def _edit_many(sources: list[str], planner: Callable[[Any], Any], options: EditOptions) -> None:
    """Several checkpoints: plan them all (reading only), stop before writing if any fails, ask
    once, then write each. Each JSON line is the object one checkpoint gives (its plan names its
    source)."""
    from lstm_surgeon.batch import plan_edits, total_bytes, write_edits
    from lstm_surgeon.render import result_line

    out = _output(options.json, json_lines=True)
    destinations = None if options.dry_run else _destinations(sources, options)
    planned = plan_edits(sources, planner, destinations)
    for outcome in planned:
        if outcome.error is not None:
            out.error(str(outcome.error), outcome.error.exit_code, outcome.source)
        else:
            out.show(f"{outcome.source}:")
            _show_plan(out, outcome.value)
    if any(outcome.error is not None for outcome in planned):
        out.note("nothing written")
        raise typer.Exit(2)
    if destinations is None:
        for outcome in planned:
            out.data(_edit_document(options, outcome.value, None))
        out.note("dry run: nothing written")
        return
    if not _confirmed(options, [outcome.value for outcome in planned], str(options.output)):
        out.note("nothing written")
        raise typer.Exit(1)
    worst = 0
    with out.progress("copying", total_bytes(sources)) as progress:
        for outcome in write_edits(sources, planner, destinations, progress):
            if outcome.error is not None:
                out.error(str(outcome.error), outcome.error.exit_code, outcome.source)
                worst = max(worst, outcome.error.exit_code)
                continue
            plan, result = outcome.value
            out.show(result_line(result))
            out.data(_edit_document(options, plan, result))
    if worst:
        raise typer.Exit(worst)


def _destinations(sources: list[str], options: EditOptions) -> dict[str, Any]:
    """Each checkpoint's destination: itself (--in-place), or its place in the -o folder."""
    from lstm_surgeon.apply import Destination
    from lstm_surgeon.batch import output_paths

    if options.in_place == (options.output is not None):
        raise OutputError("give exactly one of -o/--output FOLDER and --in-place")
    outputs = output_paths(sources, options.output) if options.output is not None else {}
    return {
        source: Destination(
            outputs.get(source), options.in_place, options.force, options.backup, options.fsync
        )
        for source in sources
    }


def _confirmed(options: EditOptions, plans: list[Any], target: str) -> bool:
    """Ask before writing only when a person is there to answer (a terminal, no --yes, no --json)."""
    if options.yes or options.dry_run or options.json or not sys.stdin.isatty():
        return True
    if options.in_place and not any(plan.changes_anything for plan in plans):
        return True
    if options.in_place:
        target = (
            "the checkpoint in place" if len(plans) == 1 else f"{len(plans)} checkpoints in place"
        )
    elif len(plans) > 1:
        target = f"{len(plans)} checkpoints into {target}"
    return typer.confirm(f"Write {target}?", default=True, err=True)


@app.command("set-forget-bias")
@_command
def set_forget_bias(
    checkpoints: CheckpointsArg,
    value: Annotated[
        float | None, typer.Option("--value", help="The forget-gate bias V [default: 1].")
    ] = None,
    chrono: Annotated[
        float | None,
        typer.Option(
            "--chrono", metavar="T_MAX", help="Chrono init: b_f ~ log(U(1, T_MAX-1)), b_i = -b_f."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for --chrono.")] = None,
    mode: ModeOpt = "effective",
    layer: LayerOpt = None,
    sublayer: SublayerOpt = None,
    direction: DirectionOpt = None,
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json: JsonOpt = False,
    backup: BackupOpt = False,
    fsync: FsyncOpt = False,
    rename: RenameOpt = None,
) -> None:
    """Set the forget-gate bias of every LSTM (default: the gate sees exactly 1).

    Example:

    \b
    lstm-surgeon set-forget-bias model.pt -o fixed.pt
    """
    from lstm_surgeon.surgery import plan_chrono, plan_set_forget_bias

    selection = _selection(layer, sublayer, direction)
    if chrono is not None and value is not None:
        raise EditError("give either --value or --chrono, not both")
    if chrono is None and seed is not None:
        raise EditError("--seed goes with --chrono")
    if chrono is not None:
        planner = lambda ck: plan_chrono(ck, chrono, seed, mode, selection)  # noqa: E731
    else:
        bias = 1.0 if value is None else value
        planner = lambda ck: plan_set_forget_bias(ck, bias, mode, selection)  # noqa: E731
    options = EditOptions.of(locals())
    _edit(checkpoints, planner, options)


@app.command("set-gate-bias")
@_command
def set_gate_bias(
    checkpoints: CheckpointsArg,
    gate: Annotated[
        str,
        typer.Option(
            "--gate",
            metavar="NAME",
            help="input/forget/cell/output (i, f, g, o) for LSTM; reset/update/new (r, z, n) for "
            "GRU; hidden for RNN.",
        ),
    ],
    value: Annotated[float, typer.Option("--value", help="The bias V.")],
    mode: ModeOpt = "effective",
    layer: LayerOpt = None,
    sublayer: SublayerOpt = None,
    direction: DirectionOpt = None,
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json: JsonOpt = False,
    backup: BackupOpt = False,
    fsync: FsyncOpt = False,
    rename: RenameOpt = None,
) -> None:
    """Set one gate's bias in every layer that has that gate.

    Example:

    \b
    lstm-surgeon set-gate-bias model.pt --gate update --value -1 -o out.pt
    """
    from lstm_surgeon.surgery import plan_set_gate_bias

    selection = _selection(layer, sublayer, direction)
    options = EditOptions.of(locals())
    _edit(
        checkpoints,
        lambda ck: plan_set_gate_bias(ck, gate, value, mode, selection),
        options,
    )


@app.command("zero-bias")
@_command
def zero_bias(
    checkpoints: CheckpointsArg,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="NAME", help="Only this gate (repeatable; default all)."),
    ] = None,
    drop: Annotated[
        bool, typer.Option("--drop", help="Remove the bias tensors (for bias=False modules).")
    ] = False,
    drop_optimizer_state: DropOptimizerOpt = False,
    layer: LayerOpt = None,
    sublayer: SublayerOpt = None,
    direction: DirectionOpt = None,
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json: JsonOpt = False,
    backup: BackupOpt = False,
    fsync: FsyncOpt = False,
    rename: RenameOpt = None,
) -> None:
    """Zero the biases of recurrent layers, or drop them with --drop.

    Example:

    \b
    lstm-surgeon zero-bias model.pt --drop -o nobias.pt
    """
    from lstm_surgeon.surgery import plan_zero_bias

    selection = _selection(layer, sublayer, direction)
    options = EditOptions.of(locals())
    _edit(
        checkpoints,
        lambda ck: plan_zero_bias(ck, gate or (), drop, selection, drop_optimizer_state),
        options,
    )


@app.command("add-bias")
@_command
def add_bias(
    checkpoints: CheckpointsArg,
    drop_optimizer_state: DropOptimizerOpt = False,
    layer: LayerOpt = None,
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json: JsonOpt = False,
    backup: BackupOpt = False,
    fsync: FsyncOpt = False,
    rename: RenameOpt = None,
) -> None:
    """Give bias=False layers zero biases, so they load into bias=True modules.

    Example:

    \b
    lstm-surgeon add-bias nobias.pt -o biased.pt
    """
    from lstm_surgeon.surgery import plan_add_bias

    selection = _selection(layer)
    options = EditOptions.of(locals())
    _edit(
        checkpoints,
        lambda ck: plan_add_bias(ck, selection, drop_optimizer_state),
        options,
    )


@app.command("zero-input")
@_command
def zero_input(
    checkpoints: CheckpointsArg,
    features: Annotated[
        str,
        typer.Option(
            "--features", metavar="LIST", help="Comma-separated input feature indices, e.g. 2,5."
        ),
    ],
    layer: LayerOpt = None,
    direction: DirectionOpt = None,
    output: OutputOpt = None,
    in_place: InPlaceOpt = False,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json: JsonOpt = False,
    backup: BackupOpt = False,
    fsync: FsyncOpt = False,
    rename: RenameOpt = None,
) -> None:
    """Zero input columns of sub-layer 0's weight_ih, so the model ignores those features.

    Example:

    \b
    lstm-surgeon zero-input model.pt --features 2,5 -o out.pt
    """
    from lstm_surgeon.surgery import parse_features, plan_zero_input

    indices = parse_features(features)
    selection = _selection(layer, None, direction)
    options = EditOptions.of(locals())
    _edit(
        checkpoints,
        lambda ck: plan_zero_input(ck, indices, selection),
        options,
    )


@app.command()
@_command
def verify(
    checkpoints: CheckpointsArg,
    layer: LayerOpt = None,
    rename: RenameOpt = None,
    json: JsonOpt = False,
    recurrent_activation: RecurrentActivationOpt = None,
) -> None:
    """Load every layer into the real torch module (strict) and run it; exit 1 if any fails.

    Example:

    \b
    lstm-surgeon verify fixed.pt
    lstm-surgeon verify 'runs/*/last.ckpt'
    """
    from lstm_surgeon.batch import verify_each
    from lstm_surgeon.renames import parse_renames
    from lstm_surgeon.render import verification_view

    def show(out: Any, verification: Any) -> int:
        for warning in verification.warnings:
            out.warn(warning)
        for checked in verification.layers:
            for note in checked.notes:
                out.warn(f"{checked.name}: {note}")
        out.show(verification_view(verification))
        out.data(verification.to_dict())
        return 0 if verification.ok else 1

    rules = parse_renames(rename or ())
    _report_each(
        checkpoints,
        json,
        lambda sources, out: verify_each(sources, layer or (), rules, recurrent_activation),
        show,
    )


@app.command()
@_command
def convert(
    checkpoint: CheckpointArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", metavar="PATH", help="The PyTorch state dict (.safetensors or .pt)."
        ),
    ],
    carry_all: Annotated[
        bool, typer.Option("--all", help="Also carry every other tensor under its own name.")
    ] = False,
    layer: LayerOpt = None,
    force: ForceOpt = False,
    fsync: FsyncOpt = False,
    rename: RenameOpt = None,
    json: JsonOpt = False,
    recurrent_activation: RecurrentActivationOpt = None,
) -> None:
    """Write the recurrent layers of any readable file as a PyTorch state dict.

    Gates are reordered, kernels transposed and single or packed biases split, so that torch's
    modules compute what the source computes. Cells torch cannot compute are refused.

    Example:

    \b
    lstm-surgeon convert model.onnx -o model.safetensors
    """
    from lstm_surgeon.convert import plan_conversion, write_conversion
    from lstm_surgeon.formats import open_checkpoint
    from lstm_surgeon.formats.keras_weights import assume_recurrent_activation
    from lstm_surgeon.renames import parse_renames, renamed
    from lstm_surgeon.render import conversion_view

    out = _output(json)
    rules = parse_renames(rename or ())
    with open_checkpoint(checkpoint) as opened:
        if recurrent_activation is not None:
            assume_recurrent_activation(opened, recurrent_activation)
        view = renamed(opened, rules)
        conversion = plan_conversion(view, tuple(layer or ()), carry_all)
        written = write_conversion(conversion, view, output, force, fsync)
    out.show(conversion_view(conversion, output, written))
    out.data({**conversion.to_dict(), "output": str(output), "format": written})


@app.command()
@_command
def recover(
    checkpoint: Annotated[
        Path,
        typer.Argument(metavar="CHECKPOINT", help="A file whose in-place edit was interrupted."),
    ],
    json: JsonOpt = False,
) -> None:
    """Roll back an interrupted in-place edit (every file it touched); nothing to do is fine.

    Example:

    \b
    lstm-surgeon recover model.pt
    """
    from lstm_surgeon.apply import recover_checkpoint

    out = _output(json)
    rolled_back = recover_checkpoint(checkpoint)
    message = "rolled back an interrupted in-place edit" if rolled_back else "nothing to recover"
    out.show(f"{checkpoint}: {message}")
    out.data({"path": str(checkpoint), "rolled_back": rolled_back})


@app.command()
@_command
def check(checkpoints: CheckpointsArg, rename: RenameOpt = None, json: JsonOpt = False) -> None:
    """Check structure, every zip CRC-32, header rules and NaN/Inf; exit 1 if anything is wrong.

    Example:

    \b
    lstm-surgeon check downloaded.pt
    lstm-surgeon check 'runs/*/last.ckpt' https://example.com/model.safetensors
    """
    from lstm_surgeon.batch import check_each, total_bytes
    from lstm_surgeon.renames import parse_renames
    from lstm_surgeon.render import check_view

    rules = parse_renames(rename or ())

    def run(sources: list[str], out: Any) -> Iterator[Any]:
        with out.progress("checking", total_bytes(sources)) as progress:
            yield from check_each(sources, progress, rules)

    def show(out: Any, report: Any) -> int:
        out.show(check_view(report))
        out.data(report.to_dict())
        return 0 if report.sound else 1

    _report_each(checkpoints, json, run, show)


@app.command()
@_command
def diff(
    a: Annotated[
        str, typer.Argument(metavar="A", help="The first checkpoint (any format; a path or URL).")
    ],
    b: Annotated[
        str, typer.Argument(metavar="B", help="The second checkpoint (any format; a path or URL).")
    ],
    layer: LayerOpt = None,
    atol: Annotated[
        float,
        typer.Option("--atol", help="Absolute tolerance: equal when |a-b| <= atol + rtol*|b|."),
    ] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance (of B's value).")] = 0.0,
    strip_prefix: Annotated[
        list[str] | None,
        typer.Option(
            "--strip-prefix",
            help="Ignore this key prefix on both sides, e.g. module. or _orig_mod. (repeatable).",
        ),
    ] = None,
    hist: HistOpt = False,
    match: Annotated[
        list[str] | None,
        typer.Option(
            "--match",
            metavar="A=B",
            help="Compare layer A of the first file with layer B of the second (repeatable); "
            "layers of different frameworks are otherwise matched by name, then by order and shape.",
        ),
    ] = None,
    rename: RenameOpt = None,
    json: JsonOpt = False,
) -> None:
    """Compare two checkpoints tensor by tensor and gate by gate; exit 1 if they differ.

    Example:

    \b
    lstm-surgeon diff before.pt after.safetensors --strip-prefix module.
    """
    from lstm_surgeon.diff import diff_checkpoints
    from lstm_surgeon.formats import open_checkpoint
    from lstm_surgeon.layer_diff import parse_matches
    from lstm_surgeon.renames import parse_renames, renamed
    from lstm_surgeon.render_diff import diff_view

    out = _output(json)
    rules = parse_renames(rename or ())
    with (
        open_checkpoint(a) as first,
        open_checkpoint(b) as second,
        out.progress("comparing", first.size) as progress,
    ):
        result = diff_checkpoints(
            renamed(first, rules),
            renamed(second, rules),
            atol=atol,
            rtol=rtol,
            layer_globs=layer or (),
            strip_prefixes=strip_prefix or (),
            progress=progress,
            histograms=hist,
            matches=parse_matches(match or ()),
        )
    for warning in result.warnings:
        out.warn(warning)
    out.show(diff_view(result))
    out.data(result.to_dict())
    if not result.identical:
        raise typer.Exit(1)


@app.command()
@_command
def trend(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            metavar="CHECKPOINT...", help="The checkpoints of one training run, in any order."
        ),
    ],
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="NAME", help="Only this gate (repeatable; default all)."),
    ] = None,
    layer: LayerOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Also draw the trends into FILE.png or FILE.svg (needs lstm-surgeon[plot]).",
        ),
    ] = None,
    plot_size: Annotated[
        str,
        typer.Option("--plot-size", metavar="WxH", help="The plot's size in pixels."),
    ] = "1200x800",
    json: JsonOpt = False,
) -> None:
    """Follow each gate's bias (mean, 10th and 90th percentile) across a training run.

    The run is ordered by the step or epoch the checkpoints store, else by name.

    Example:

    \b
    lstm-surgeon trend runs/exp1/*.ckpt --gate forget --plot forget.png
    """
    from lstm_surgeon.plot import plot_request, write_plot
    from lstm_surgeon.render_trend import TrendView
    from lstm_surgeon.trend import follow_run

    out = _output(json)
    request = None if plot is None else plot_request(plot, plot_size)
    result = follow_run(checkpoints, gate or (), layer or ())
    for warning in result.warnings:
        out.warn(warning)
    out.show(TrendView(result))
    if request is not None:
        write_plot(result, request)
        out.note(f"plot written to {request.path}")
    out.data(result.to_dict())


def main() -> None:
    """Entry point of the `lstm-surgeon` console script."""
    app(prog_name="lstm-surgeon")
