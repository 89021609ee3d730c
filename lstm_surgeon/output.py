"""One output sink with a human mode (rich, stdout) and a JSON mode; hints and errors go to stderr.

Colour follows rich's rules: off when `NO_COLOR` is set or the stream is not a terminal. Output that is
not a terminal has no width to wrap at: tables are laid out at $COLUMNS (or 120) and lines of text are
printed whole. Names read from files are printed as plain `Text` with control characters escaped, so a
tensor name cannot inject markup or terminal escape codes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

PROGRESS_MIN_BYTES = 256 * 1024 * 1024
WIDE_ENOUGH = 120  # width for tables when stdout is not a terminal (no width to read)


def _columns() -> int:
    """The table width when stdout is not a terminal: $COLUMNS if it is a number, else 120."""
    try:
        return max(40, int(os.environ.get("COLUMNS", WIDE_ENOUGH)))
    except ValueError:
        return WIDE_ENOUGH


def clean(name: str) -> str:
    """`name` with control characters shown as escapes (`\\x1b`), safe to print on a terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as strings ("nan", "inf", "-inf"): strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class Output:
    """Where a command's results go: rich renderables for people, or one JSON document."""

    def __init__(self, json_mode: bool = False, json_lines: bool = False) -> None:
        self.json_mode = json_mode
        self.json_lines = json_lines  # several checkpoints: one compact object per line
        terminal = sys.stdout.isatty()
        if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
            # A stdout that cannot encode a character (PYTHONIOENCODING=ascii) shows `?` for it
            # rather than failing the command; histograms switch to ASCII glyphs by themselves.
            sys.stdout.reconfigure(errors="replace")
        # Not a terminal: tables get a fixed width, and lines of text (notes, titles) are printed
        # whole, never wrapped mid-sentence at that width (soft_wrap).
        self.stdout = Console(
            highlight=False, width=None if terminal else _columns(), soft_wrap=not terminal
        )
        self.stderr = Console(stderr=True, highlight=False, soft_wrap=True)

    def show(self, *renderables: RenderableType) -> None:
        """Print for people (nothing in JSON mode: stdout then holds the JSON document only)."""
        if not self.json_mode:
            for renderable in renderables:
                self.stdout.print(renderable)

    def data(self, document: dict[str, Any]) -> None:
        """Print the JSON document (JSON mode only)."""
        if self.json_mode:
            indent = None if self.json_lines else 2
            text = json.dumps(json_safe(document), indent=indent, allow_nan=False)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None] | None]:
        """A byte-progress callback shown on stderr for long operations, or None (JSON mode, CI, not a
        terminal, or less than PROGRESS_MIN_BYTES of work)."""
        quiet = self.json_mode or os.environ.get("CI") or not self.stderr.is_terminal
        if quiet or total < PROGRESS_MIN_BYTES:
            yield None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
        )
        # Started on the first byte, so the bar never covers the preview or a question.
        bar = Progress(*columns, console=self.stderr, transient=True)
        task = bar.add_task(description, total=total)

        def advance(done: int) -> None:
            if not bar.live.is_started:
                bar.start()
            bar.advance(task, done)

        try:
            yield advance
        finally:
            if bar.live.is_started:
                bar.stop()

    def warn(self, message: str) -> None:
        self.stderr.print(Text(f"warning: {clean(message)}", style="yellow"))

    def note(self, message: str) -> None:
        self.stderr.print(Text(clean(message), style="dim"))

    def error(self, message: str, exit_code: int, path: str | None = None) -> None:
        """The one error line on stderr, and in JSON mode the error object on stdout."""
        self.stderr.print(Text(f"lstm-surgeon: error: {clean(message)}", style="red"))
        self.error_document(message, exit_code, path)

    def error_document(self, message: str, exit_code: int, path: str | None = None) -> None:
        """In JSON mode, `{"error": {"message": ..., "exit_code": ...}}` on stdout: a failed run
        still gives a script that parses stdout one object, with the code the process exits with.
        Among several checkpoints, the object also names the checkpoint (`path`) that failed."""
        error: dict[str, Any] = {"message": message, "exit_code": exit_code}
        if path is not None:
            error["path"] = path
        self.data({"error": error})
