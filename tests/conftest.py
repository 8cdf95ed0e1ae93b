"""Fixtures for the whole suite."""

import sys

import pytest

from .cli_runs import write_tiny_run


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a tiny corpus (cli_runs.write_tiny_run) for command-line runs, and caches in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_run(tmp_path)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def read_class_sources_once():
    """Building the CLI reads the source of every class it configures for its attribute docstrings, once per
    subcommand: 1.5 of the 2 s each cli.main call takes. The sources do not change while the tests run."""
    from docstring_parser.attrdoc import AttributeDocstrings

    read, seen = AttributeDocstrings.get_attr_docs, {}

    def get_attr_docs(self, component):
        if component not in seen:
            seen[component] = read(self, component)
        return dict(seen[component])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AttributeDocstrings, "get_attr_docs", get_attr_docs)
        yield
