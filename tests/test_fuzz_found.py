"""The fuzzer's found examples (``tests/test_fuzz.py``), each a test of its own: they run on every CI run, beside the
drawn examples rather than after them (``pytest-xdist`` runs one file per worker)."""

from __future__ import annotations

import pytest

from .test_fuzz import FOUND, check_architecture


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_example(name):
    spec, seed = FOUND[name]
    check_architecture(spec, seed)
