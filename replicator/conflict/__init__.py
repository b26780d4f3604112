"""Conflict resolution of the two-way sync: versions, rules, echoes (pure).

The applier feeds it source changes and stores what it decides; nothing here
does I/O.
"""

from __future__ import annotations

from replicator.conflict.echo import PendingWrite, is_own_origin, split_echoes
from replicator.conflict.rules import (
    Change,
    Conflict,
    DeletePolicy,
    EntityRule,
    FieldRule,
    FieldState,
    Resolution,
    UnifiedState,
    canonical_value,
    delete_effect,
    is_gone,
    resolve,
    values_equal,
)
from replicator.conflict.versions import (
    Version,
    position_key,
    version_from_json,
    version_key,
    version_to_json,
)

__all__ = [
    "Change",
    "Conflict",
    "DeletePolicy",
    "EntityRule",
    "FieldRule",
    "FieldState",
    "PendingWrite",
    "Resolution",
    "UnifiedState",
    "Version",
    "canonical_value",
    "delete_effect",
    "is_gone",
    "is_own_origin",
    "position_key",
    "resolve",
    "split_echoes",
    "values_equal",
    "version_from_json",
    "version_key",
    "version_to_json",
]
