"""A local Salesforce org: OAuth, REST, SOQL and the CometD Streaming API with CDC.

Nothing here imports from ``replicator.sources`` or ``replicator.sinks``: the
client must not shape the server it is tested against.
"""

from __future__ import annotations

__all__: list[str] = []
