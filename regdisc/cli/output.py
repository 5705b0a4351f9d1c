"""How the command line shows results: aligned tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from ..model import Instance, rfc3339


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths)]
        lines.append("  ".join(padded + [row[-1]]).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """``name  value`` lines, the values aligned."""
    return table(("FIELD", "VALUE"), pairs).split("\n", 1)[1]


def instance_rows(instances: Sequence[Instance]) -> str:
    """Instances as a table, one line each."""
    return table(
        ("ID", "HOST", "PORT", "STATUS", "TTL", "EXPIRES", "TAGS", "METADATA"),
        [
            (
                i.id,
                i.host,
                i.port,
                i.status,
                i.ttl,
                rfc3339(i.expires_at),
                ",".join(i.tags) or "-",
                ",".join(f"{k}={v}" for k, v in sorted(i.metadata.items())) or "-",
            )
            for i in instances
        ],
    )


def instance_fields(instance: Instance) -> str:
    """One instance, field by field."""
    wire = instance.to_json()
    wire["tags"] = ",".join(instance.tags) or "-"
    wire["metadata"] = ",".join(f"{k}={v}" for k, v in sorted(instance.metadata.items())) or "-"
    return fields(list(wire.items()))


def as_json(data: Any) -> str:
    """Data as indented JSON."""
    return json.dumps(data, indent=2, sort_keys=True)


def fail(message: str, status: int = 1) -> int:
    """Say what went wrong on one line of standard error; return ``status``."""
    print(f"regdisc: error: {message}", file=sys.stderr)
    return status
