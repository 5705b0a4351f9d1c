"""``python -m regdisc.cli``: the same as the ``regdisc`` command."""

from . import run

run()
