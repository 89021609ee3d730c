"""Find every recurrent layer and cell in a checkpoint, through every registered layout.

Each layout (`layouts/`) recognises its own framework's parameters by names *and* shapes; discovery
asks them all and selects layers by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.layers import RecurrentLayer
from lstm_surgeon.layouts import find_layers


@dataclass
class Discovery:
    """What discovery found: the layers, and warnings about parameters that fit no recurrent module."""

    layers: list[RecurrentLayer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def recurrent_tensor_names(self) -> set[str]:
        return {name for layer in self.layers for name in layer.tensor_names()}


class NoLayerSelected(SurgeonError):
    """`--layer` globs that match no recurrent layer (exit 2, naming the layers there are)."""


def discover(checkpoint: Checkpoint, layer_globs: Iterable[str] = ()) -> Discovery:
    """Every recurrent layer of the checkpoint (those whose name matches a glob, if globs are given)."""
    found = find_layers(checkpoint)
    return Discovery(select_layers(found.layers, layer_globs), found.warnings)


def select_layers(layers: list[RecurrentLayer], globs: Iterable[str]) -> list[RecurrentLayer]:
    """The layers whose name matches any of the globs (all of them when no glob is given)."""
    globs = list(globs)
    if not globs:
        return list(layers)
    return [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, g) for g in globs)]


def require_selected(layers: list[RecurrentLayer], globs: Iterable[str]) -> list[RecurrentLayer]:
    """The layers matching `globs`; an error naming the layers there are when globs match none."""
    globs = list(globs)
    selected = select_layers(layers, globs)
    if globs and not selected:
        raise NoLayerSelected(nothing_selected(layers, globs))
    return selected


def nothing_selected(layers: list[RecurrentLayer], globs: Iterable[str]) -> str:
    """Why a selection is empty, naming what there is to select."""
    if not layers:
        return "no recurrent layers found in this checkpoint"
    names = ", ".join(repr(layer.name) for layer in layers)
    wanted = " ".join(f"--layer {glob!r}" for glob in globs)
    return f"no recurrent layer matches {wanted} (layers: {names})"
