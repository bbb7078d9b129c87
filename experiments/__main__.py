"""``python -m experiments`` is the ``evo`` command (useful where the console script is not on PATH)."""
from __future__ import annotations

from experiments.cli import entry

entry()
