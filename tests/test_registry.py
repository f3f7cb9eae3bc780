"""The method registry: names match config files, duplicates and unknown names fail clearly, kwargs are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.errors import ConfigError
from opd.methods.base import Method
from opd.registry import METHODS, Registry
from opd.train import CONF_DIR


def test_every_method_has_a_config_and_vice_versa():
    assert set(METHODS) == {p.stem for p in Path(CONF_DIR, "method").glob("*.yaml")}


def test_duplicate_name_raises():
    registry = Registry("thing")

    @registry.register("a")
    class A:  # noqa: D401
        pass

    with pytest.raises(ValueError, match="already registered"):

        @registry.register("a")
        class B:
            pass


def test_unknown_name_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown name 'nope'.*gkd.*sft"):
        METHODS.get("nope")


def test_build_checks_key_names_types_and_ranges():
    assert METHODS.build({"name": "gkd", "beta": 0.0}).beta == 0.0
    with pytest.raises(ConfigError, match=r"method\.betta"):
        METHODS.build({"name": "gkd", "betta": 0.1})
    with pytest.raises(ConfigError, match=r"method\.beta"):
        METHODS.build({"name": "gkd", "beta": "high"})
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 1\]"):
        METHODS.build({"name": "gkd", "beta": 1.5})


def test_descriptions_cite_a_paper_or_say_baseline():
    for name, doc in METHODS.describe():
        assert doc, f"method {name} has no docstring"
        assert issubclass(METHODS.get(name), Method)
