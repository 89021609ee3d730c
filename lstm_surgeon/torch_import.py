"""The one way lstm-surgeon imports torch: late, only where it is needed, with a clear error."""

from __future__ import annotations

from types import ModuleType

from lstm_surgeon.errors import SurgeonError


def import_torch(purpose: str) -> ModuleType:
    """torch, or an error that says which command needs it and how to get it."""
    try:
        import torch
    except ImportError:
        raise SurgeonError(f"{purpose} needs torch: pip install torch") from None
    return torch
