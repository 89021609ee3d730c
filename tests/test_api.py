"""The library API: every name `lstm_surgeon` exports resolves (they are imported on first use)."""

from __future__ import annotations

import pytest

import lstm_surgeon


@pytest.mark.parametrize("name", lstm_surgeon.__all__)
def test_every_exported_name_resolves(name):
    value = getattr(lstm_surgeon, name)
    assert value is not None
    if name != "__version__":
        assert getattr(value, "__name__", name) == name


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lstm_surgeon.nope  # noqa: B018
