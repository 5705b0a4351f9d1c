"""The twistd drop-in: `twistd -n regdisc` (the code lives in regdisc.tap)."""

from twisted.application.service import ServiceMaker

regdisc = ServiceMaker(
    "regdisc", "regdisc.tap", "Service registry and discovery over mutual TLS", "regdisc"
)
