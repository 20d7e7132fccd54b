"""Which tests a layer's run keeps (the plan's ``exclude_tags_for_mode``).

A test marked for one or more layers runs only in runs of those layers. A test without any layer
marker runs in every layer: the plugin never deselects what the user did not mark, so installing
provisioner does not change an existing suite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from provisioner.layers import Layer

Item = TypeVar("Item")


def marker_description(layer: Layer) -> str:
    return f"{layer.name}: run only in the {layer.name!r} layer ({layer.description})"


def layer_marks(marker_names: Iterable[str], layer_names: Iterable[str]) -> set[str]:
    """The layer markers among a test's markers."""
    return set(marker_names) & set(layer_names)


def split_by_layer(
    items: Sequence[tuple[Item, Iterable[str]]], active: str, layer_names: Iterable[str]
) -> tuple[list[Item], list[Item]]:
    """(kept, deselected) for ``items`` given as (item, its marker names)."""
    names = set(layer_names)
    kept: list[Item] = []
    deselected: list[Item] = []
    for item, markers in items:
        marks = layer_marks(markers, names)
        (kept if not marks or active in marks else deselected).append(item)
    return kept, deselected
