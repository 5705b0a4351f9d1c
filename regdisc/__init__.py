"""regdisc: a service registry and discovery daemon on Twisted."""

__version__ = "0.1.0"
