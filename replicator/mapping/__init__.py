"""Mapped entities: config, schema check, transforms, validation, matching.

Pure where it decides: nothing here does I/O. The applier and the sinks use
it to turn source fields into unified ones and back (docs/two-way-sync.md).
"""

from __future__ import annotations

from replicator.mapping.config import (
    EntitySettings,
    FieldMap,
    MatchRule,
    SyncSettings,
    ValidateRule,
)
from replicator.mapping.matching import MatchResult, match
from replicator.mapping.schema_check import check_mapping
from replicator.mapping.transforms import (
    Transform,
    TransformContext,
    TransformError,
    register,
)
from replicator.mapping.validation import Violation, register_rule, validate

__all__ = [
    "EntitySettings",
    "FieldMap",
    "MatchResult",
    "MatchRule",
    "SyncSettings",
    "Transform",
    "TransformContext",
    "TransformError",
    "ValidateRule",
    "Violation",
    "check_mapping",
    "match",
    "register",
    "register_rule",
    "validate",
]
