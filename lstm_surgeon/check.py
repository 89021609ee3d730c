"""`check`: is a checkpoint sound? Structure, every zip CRC-32, safetensors header rules, NaN/Inf.

torch.load does not check CRCs, so a flipped bit in a `.pt` loads silently; `check` reads every byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import folder_format, open_checkpoint
from lstm_surgeon.renames import RenameRule, renamed
from lstm_surgeon.writing import RECOVER_HINT, Progress, StaleJournalError


@dataclass
class CheckReport:
    path: str
    format: str | None
    problems: list[str] = field(default_factory=list)
    records_checked: int = 0
    tensors_scanned: int = 0

    @property
    def sound(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "sound": self.sound,
            "problems": list(self.problems),
            "records_checked": self.records_checked,
            "tensors_scanned": self.tensors_scanned,
        }


def check_checkpoint(
    path: Path, progress: Progress | None = None, renames: Iterable[RenameRule] = ()
) -> CheckReport:
    """Every problem found in the file; missing files and folders raise (they are not checkpoints).

    Checking only reads. A file whose in-place edit was interrupted is a problem (other programs
    read the bytes on disk, which may be half edited); the rest of the report describes the
    checkpoint the rollback restores, or, when the journal no longer fits, the bytes on disk."""
    local = isinstance(path, Path)  # not a URL (`remote.RemoteLocation`)
    folder = folder_format(path) if local else None
    if folder is not None:
        structure = folder.structure_problems(path)
        if structure:  # the files disagree, so they cannot be opened as one checkpoint
            return CheckReport(str(path), folder.name, structure)
    elif local and not path.is_file():
        open_checkpoint(path)  # raises the same clear error every command gives
    problems = []
    try:
        checkpoint = _open(path, problems)
    except CheckpointError as error:
        return CheckReport(str(path), None, [*problems, str(error)])
    with checkpoint:
        report = CheckReport(str(path), checkpoint.format_name, problems)
        _check_records(checkpoint, report, progress)
        _check_recurrent_values(renamed(checkpoint, renames), report)
    return report


def _open(path: Path, problems: list[str]) -> Checkpoint:
    try:
        checkpoint = open_checkpoint(path)
    except StaleJournalError as error:
        problems.append(str(error))
        return open_checkpoint(path, ignore_journal=True)
    if any(file.pending_rollback for file in checkpoint.files):
        problems.append(
            "an in-place edit of this file was interrupted, so the bytes on disk may be half "
            f"edited; {RECOVER_HINT.format(path=path)} (the other checks describe the checkpoint "
            "the rollback restores)"
        )
    return checkpoint


def _check_records(checkpoint: Checkpoint, report: CheckReport, progress: Progress | None) -> None:
    report.records_checked, problems = checkpoint.format.checksum_problems(checkpoint, progress)
    report.problems += problems


def _check_recurrent_values(checkpoint: Checkpoint, report: CheckReport) -> None:
    found = discover(checkpoint)
    report.problems += [f"discovery: {warning}" for warning in found.warnings]
    for layer in found.layers:
        for cell in layer.cells:
            for ref in cell.tensors():
                values = checkpoint.values(ref)
                report.tensors_scanned += 1
                nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
                if nan or inf:
                    report.problems.append(f"{ref.name}: {nan} NaN and {inf} Inf values")
