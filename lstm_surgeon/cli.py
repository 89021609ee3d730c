"""The `lstm-surgeon` command: parses options, calls the library, renders. No logic lives here.

Errors from the library (`SurgeonError`) become one line on stderr and an exit code, in one place
(`_command`); `--debug` (or LSTM_SURGEON_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lstm_surgeon import __version__
from lstm_surgeon.errors import Interrupted, SurgeonError
from lstm_surgeon.output import Output

app = typer.Typer(
    name="lstm-surgeon",
    help="Inspect and edit the LSTM, GRU and RNN layers inside saved PyTorch checkpoints "
    "(torch.save .pt files and .safetensors), without the training code.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])
_debug = {"on": os.environ.get("LSTM_SURGEON_DEBUG", "") not in ("", "0")}

# Options shared by several commands, defined once.
CheckpointArg = Annotated[Path, typer.Argument(help="A .pt (torch.save) or .safetensors file.")]
LayerOpt = Annotated[
    list[str] | None,
    typer.Option("--layer", "-l", help="Only layers whose name matches this glob (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout and nothing else.")]


def _command(function: F) -> F:
    """Turn library errors and Ctrl-C into one stderr line and an exit code."""

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
            Output().error(str(error))
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]


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
    if debug:
        _debug["on"] = True


@app.command()
@_command
def inspect(checkpoint: CheckpointArg, layer: LayerOpt = None, json: JsonOpt = False) -> None:
    """Show every recurrent layer with its gate-sliced biases.

    Example: [bold]lstm-surgeon inspect model.pt --layer 'encoder*'[/bold]
    """
    from lstm_surgeon.formats import open_checkpoint
    from lstm_surgeon.inspection import inspect_checkpoint
    from lstm_surgeon.render import inspection_view

    out = Output(json)
    with open_checkpoint(checkpoint) as opened:
        inspection = inspect_checkpoint(opened, layer or ())
    for warning in inspection.warnings:
        out.warn(warning)
    out.show(inspection_view(inspection))
    out.data(inspection.to_dict())


def main() -> None:
    """Entry point of the `lstm-surgeon` console script."""
    app(prog_name="lstm-surgeon")
