"""Where log events go: text or JSON lines on a stream, filtered by level."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)


def make_observer(log_format: str, level: LogLevel, stream: IO[str]) -> ILogObserver:
    """An observer writing events at ``level`` or above to ``stream``.

    ``json`` writes one JSON object per line, ready for journald or a shipper.
    """
    if log_format == "json":
        sink: ILogObserver = FileLogObserver(stream, json_line)
    else:
        sink = textFileLogObserver(stream)
    return FilteringLogObserver(sink, [LogLevelFilterPredicate(defaultLogLevel=level)])


def json_line(event: dict[str, Any]) -> str:
    """One event as a flat JSON object on one line.

    It keeps the event's own fields and replaces twisted.logger's bookkeeping
    (``log_*`` keys) with ``time``, ``level``, ``namespace``, ``message`` and,
    for a failure, ``traceback``.
    """
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).isoformat(
            timespec="milliseconds"
        ).replace("+00:00", "Z"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in line and key not in _LEGACY:
            line[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
    return json.dumps(line, default=repr, separators=(",", ":")) + "\n"


# Keys that twisted.python.log adds to events from legacy emitters.
_LEGACY = frozenset({"message", "time", "isError", "system", "format", "why", "failure"})
