"""The definition of every key of the experiment's results, declared where the keys are made.

Each module that builds part of the results declares the keys of its records as `Keys`, beside the function
that builds them: a description per key, or the `Keys` of a nested record, or `each(...)` for a list or a
map whose entries share a definition ("*" in a dotted path). A builder makes its record with
`Keys.build(key=value, ...)`, which refuses a key the declaration lacks and a declared key it is not given;
`check` walks a whole results tree against the declarations (records made elsewhere, such as
`atoms.evidence.claim_record` and `atoms.cards.Card.to_json`, and results loaded from a cache).
`definitions` flattens the declarations into the dotted-path table that `results["definitions"]` carries,
so the table and the keys come from one place and cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["Keys", "SchemaError", "check", "definitions", "each"]


class SchemaError(Exception):
    """A results key without a definition, or a defined key missing from its record: a programming error."""


class Keys:
    """The keys of one JSON object (or list) of the results, each with its definition.

    keys: key -> its description (which covers whatever lies below the key) or the Keys of a nested record;
    the key "*" stands for any other key (or list index).
    doc: a description of the object itself (it gets its own entry in `definitions`), or None.
    optional: keys a record may lack (the others are required).
    """

    def __init__(
        self, keys: Mapping[str, str | Keys], *, doc: str | None = None, optional: Iterable[str] = ()
    ) -> None:
        self.keys = dict(keys)
        self.doc = doc
        self.optional = frozenset(optional)
        unknown = self.optional - set(self.keys)
        if unknown:
            raise SchemaError(f"optional keys {sorted(unknown)} are not among the keys {list(self.keys)}")

    def build(self, **values: Any) -> dict[str, Any]:
        """The record {key: value} of `values`, in their order; raises SchemaError on an undefined key or a
        missing required one."""
        self._check_keys(values, "")
        return values

    def _check_keys(self, record: Mapping[str, Any], path: str) -> None:
        if "*" in self.keys:
            return
        undefined = [k for k in record if k not in self.keys]
        missing = [k for k in self.keys if k not in record and k not in self.optional]
        if undefined or missing:
            where = path or "a record"
            raise SchemaError(
                f"{where}: keys {undefined} have no definition, defined keys {missing} are missing; declare "
                f"them in the record's Keys (defined: {list(self.keys)})"
            )


def each(item: str | Keys, doc: str | None = None) -> Keys:
    """The Keys of a list or map whose entries all have the definition `item`."""
    return Keys({"*": item}, doc=doc)


def _entries(tree: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        yield from ((str(k), v) for k, v in tree.items())
    elif isinstance(tree, list):
        yield from ((str(i), v) for i, v in enumerate(tree))


def check(tree: Any, keys: str | Keys, path: str = "") -> None:
    """Raise SchemaError unless every key under `tree` has a definition in `keys` and every required key of
    each record is there. None stands for any record that was not computed (the sweep without --sweep)."""
    if isinstance(keys, str) or tree is None:
        return
    if not isinstance(tree, (dict, list)):
        raise SchemaError(f"{path}: defined as a record or list, got {type(tree).__name__}")
    if isinstance(tree, dict):
        keys._check_keys(tree, path)
    for key, value in _entries(tree):
        sub = keys.keys.get(key, keys.keys.get("*"))
        if sub is None:
            raise SchemaError(f"{path}.{key}: no definition (the list's entries need a '*' key)")
        check(value, sub, f"{path}.{key}" if path else key)


def definitions(keys: Keys, prefix: str = "") -> dict[str, str]:
    """{dotted path: description} of every definition under `keys` ("*" matches one key or list index)."""
    out = {}
    for key, sub in keys.keys.items():
        path = f"{prefix}{key}"
        if isinstance(sub, str):
            out[path] = sub
            continue
        if sub.doc is not None:
            out[path] = sub.doc
        out.update(definitions(sub, path + "."))
    return out
