"""
S3 endpoints resolved once per bucket, not once per request.

botocore resolves every request's endpoint with the service's rule set, and caches the result by the rule set's
parameters. S3's include the object key (and ``Prefix``, ``CopySource``), which none of its rules read: every
new key missed the cache and walked the whole rule tree on the event loop (~0.3 ms a request, ~10% of a small
write's loop time). A client here leaves out of the resolution the parameters that no rule reads, so requests to
one bucket share one resolution; the endpoint is the same, since nothing could read what is left out.

botocore has no public hook for this (``before-endpoint-resolution`` sees built-ins only): it sets a private
attribute of the client's resolver, which ``pyproject.toml`` pins the tested range of.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

__all__ = ["resolve_once_per_bucket"]

# A parameter read inside a template string: "{Bucket}", "{url#authority}".
_TEMPLATE_REFERENCE = re.compile(r"\{([A-Za-z0-9_]+)[#}]")
_unread: dict[int, tuple[dict[str, Any], frozenset[str]]] = {}


def _references(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        reference = node.get("ref")
        if isinstance(reference, str):
            yield reference
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)
    elif isinstance(node, str):
        yield from _TEMPLATE_REFERENCE.findall(node)


def unread_parameters(ruleset: dict[str, Any]) -> frozenset[str]:
    """
    The parameters of an endpoint rule set that none of its rules read.

    :param ruleset: The rule set, as botocore loads ``endpoint-rule-set-1.json``.
    :return: Their names.
    """
    read = set(_references(ruleset.get("rules", [])))
    return frozenset(name for name in ruleset.get("parameters", {}) if name not in read)


def resolve_once_per_bucket(client: Any, ruleset: dict[str, Any]) -> None:
    """
    Leave out of a client's endpoint resolution the parameters its rules never read.

    :param client: An aiobotocore client.
    :param ruleset: Its service's endpoint rule set.
    """
    resolver = getattr(client, "_ruleset_resolver", None)
    definitions = getattr(resolver, "_param_definitions", None)
    if not isinstance(definitions, dict):
        return  # a botocore of another shape: it resolves as it always did
    cached = _unread.get(id(ruleset))
    if cached is None or cached[0] is not ruleset:
        # botocore's loader keeps one rule set per process: walked once (~2 ms), not per client.
        cached = _unread[id(ruleset)] = (ruleset, unread_parameters(ruleset))
    unread = cached[1]
    kept = {name: value for name, value in definitions.items() if name not in unread}
    resolver._param_definitions = kept  # type: ignore[union-attr]
