"""`--rename 'REGEX=REPLACEMENT'`: discovery sees tensors under new names, edits still write the real ones.

Hand-written models save PyTorch-layout weights under their own names (`rnn1_w_ih`). A rename is a view:
`renamed(checkpoint, rules)` is the same checkpoint (the same files, the same byte locations) with its
tensors keyed by new names, so discovery, inspect, diff, verify and check work through it unchanged.
An edit is planned on the view and its plan then names the file's real tensors again
(`with_renames`), so patches and rewrites write exactly the tensors the file holds under their own
names. Adding tensors is refused: no rule says what a new tensor would be called in the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.discovery import Discovery
from lstm_surgeon.errors import EditError, SurgeonError
from lstm_surgeon.plan import EditPlan

RECURRENT_GATE_COUNTS = {4: "an LSTM", 3: "a GRU"}


class RenameError(SurgeonError):
    """A `--rename` rule that cannot be used: no '=', an invalid regex, or names that collide."""


@dataclass(frozen=True)
class RenameRule:
    """One rule: every match of `pattern` in a name is replaced (Python `re.sub`)."""

    pattern: re.Pattern[str]
    replacement: str

    @classmethod
    def parse(cls, text: str) -> RenameRule:
        """`REGEX=REPLACEMENT`, split at the last '=' (a regex may hold one; a name rarely does)."""
        pattern, equals, replacement = text.rpartition("=")
        if not equals or not pattern:
            raise RenameError(f"--rename {text!r}: expected REGEX=REPLACEMENT")
        try:
            return cls(re.compile(pattern), replacement)
        except re.error as error:
            raise RenameError(f"--rename {text!r}: invalid regular expression ({error})") from None

    def apply(self, name: str) -> str:
        try:
            return self.pattern.sub(self.replacement, name)
        except (re.error, IndexError) as error:
            raise RenameError(
                f"--rename {self.pattern.pattern}={self.replacement}: invalid replacement ({error})"
            ) from None


def parse_renames(texts: Iterable[str]) -> tuple[RenameRule, ...]:
    return tuple(RenameRule.parse(text) for text in texts)


def new_names(names: Iterable[str], rules: Iterable[RenameRule]) -> dict[str, str]:
    """Each new name -> the real name it stands for (the rules applied in order); two tensors
    that would share a name are an error."""
    rules = tuple(rules)
    mapping: dict[str, str] = {}
    for name in names:
        new = name
        for rule in rules:
            new = rule.apply(new)
        if new in mapping:
            raise RenameError(
                f"--rename gives {mapping[new]!r} and {name!r} the same name {new!r}; make the "
                "rules tell them apart"
            )
        mapping[new] = name
    return mapping


def renamed(checkpoint: Checkpoint, rules: Iterable[RenameRule]) -> Checkpoint:
    """The checkpoint with its tensors under new names, pointing at the same bytes (no rules: the
    checkpoint itself). The view shares the files; close the original, not the view."""
    rules = tuple(rules)
    if not rules:
        return checkpoint
    mapping = new_names(checkpoint.tensors, rules)
    return replace(
        checkpoint,
        tensors={new: replace(checkpoint.tensors[old], name=new) for new, old in mapping.items()},
    )


Planner = Callable[[Checkpoint], EditPlan]


def with_renames(planner: Planner, rules: Iterable[RenameRule]) -> Planner:
    """A planner that plans on the renamed view and names the real tensors in its plan."""
    rules = tuple(rules)
    if not rules:
        return planner

    def plan(checkpoint: Checkpoint) -> EditPlan:
        return real_names(planner(renamed(checkpoint, rules)), checkpoint, rules)

    return plan


def real_names(plan: EditPlan, checkpoint: Checkpoint, rules: Iterable[RenameRule]) -> EditPlan:
    """The plan made on a renamed view, with every edit and removal naming the file's tensor."""
    if plan.additions:
        raise EditError(
            "adding tensors with --rename is not supported: nothing says what the new tensors "
            f"would be called in the file (the plan adds {plan.additions[0].tensor!r})"
        )
    real = new_names(checkpoint.tensors, rules)
    edits = [
        replace(edit, region=replace(edit.region, tensor=checkpoint.tensors[real[edit.tensor]]))
        for edit in plan.edits
    ]
    removals = [replace(removal, tensor=real[removal.tensor]) for removal in plan.removals]
    return replace(plan, edits=edits, removals=removals)


def rename_hint(checkpoint: Checkpoint, found: Discovery) -> str | None:
    """When no layer was found but two 2-D tensors are shaped like a recurrent layer's weight_ih
    and weight_hh (the same rows, 4x or 3x the hidden weight's columns), how to map them."""
    if found.layers:
        return None
    pair = _weight_pair(list(checkpoint.tensors.values()))
    if pair is None:
        return None
    weight_ih, weight_hh, kind = pair
    return (
        f"hint: {weight_ih.name!r} and {weight_hh.name!r} are shaped like {kind}'s weight_ih and "
        "weight_hh, under names that are not PyTorch's; map them with --rename "
        f"(e.g. --rename '^{re.escape(weight_ih.name)}$=rnn.weight_ih_l0' --rename "
        f"'^{re.escape(weight_hh.name)}$=rnn.weight_hh_l0', and the biases likewise)"
    )


def _weight_pair(tensors: list[TensorRef]) -> tuple[TensorRef, TensorRef, str] | None:
    matrices = [ref for ref in tensors if len(ref.shape) == 2 and min(ref.shape) > 0]
    for weight_hh in matrices:
        rows, hidden = weight_hh.shape
        kind = RECURRENT_GATE_COUNTS.get(rows // hidden) if rows % hidden == 0 else None
        if kind is None:
            continue
        for weight_ih in matrices:
            if weight_ih is not weight_hh and weight_ih.shape[0] == rows:
                return weight_ih, weight_hh, kind
    return None
