"""One documented import path: ``model_runner.sink.__all__`` is what its modules make public, and nothing else."""

from __future__ import annotations
import __future__

import importlib
import inspect
import logging
import pkgutil
import types

import pytest

import model_runner.sink as package

MODULES = sorted(info.name for info in pkgutil.iter_modules(package.__path__))

# The machinery under the sinks: their public names serve the other modules and the tests; the package exports none.
INTERNAL_MODULES = {
    "budget",
    "connections",
    "credentials",
    "encoding",
    "endpoints",
    "loop_thread",
    "responses",
    "upload",
}

# Public names of the other modules that the package deliberately does not export, and why.
INTERNAL = {
    "async_s3_sink.object_key": "the key rule without a sink, for the backfill and the benchmarks",
    "clients.ClientOptions": "the client registry's key, built by the sinks (and the backfill's cleanup)",
    "clients.SharedClient": "what the registry lends a call",
    "clients.SharedClients": "the registry itself",
    "clients.InFlight": "a sink's count of its running writes",
    "clients.shared_client": "how a call borrows a client",
    "metrics.error_type": "the error label the metrics and the logs share",
    "settings.resolve_client_settings": "the two sinks' handling of the deprecated keywords",
}


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(f"{package.__name__}.{name}")


def _defined_here(module: types.ModuleType) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }


def test_all_lists_exactly_the_public_members_of_the_package() -> None:
    members = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and value is not __future__.annotations
    }
    assert sorted(package.__all__) == sorted(members)
    assert len(set(package.__all__)) == len(package.__all__)


@pytest.mark.parametrize("name", package.__all__)
def test_every_exported_name_comes_from_the_module_that_defines_and_lists_it(name: str) -> None:
    value = getattr(package, name)
    home = value.__module__
    assert home.startswith(f"{package.__name__}."), f"{name} is defined in {home}, outside the sink"
    module = importlib.import_module(home)
    assert getattr(module, name) is value
    assert name in module.__all__, f"{home} does not list {name} in its __all__"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_definition_is_exported_or_deliberately_internal(name: str) -> None:
    module = _module(name)
    for member in module.__all__:
        assert hasattr(module, member), f"{name}.__all__ lists {member}, which it lacks"
    if name in INTERNAL_MODULES:
        return
    unexported = {member for member in _defined_here(module) if member not in package.__all__}
    assert unexported == {key.split(".")[1] for key in INTERNAL if key.startswith(f"{name}.")}


def test_every_internal_entry_names_something_that_exists() -> None:
    for key in INTERNAL:
        module, member = key.split(".")
        assert hasattr(_module(module), member), key
    assert set(MODULES) >= INTERNAL_MODULES


def test_the_seed_s_import_path_and_logger_stay() -> None:
    from model_runner.sink.s3_sink import S3Sink, logger

    assert S3Sink is package.S3Sink
    assert logger is logging.getLogger("model_runner.sink.s3_sink")
    # One logger object for both sinks, not two lookups of one name.
    assert _module("async_s3_sink").logger is logger
