"""The user-facing layer: experiment configs (``experiments/*.yaml``), their schema and the ``evo`` CLI.

``experiments.config`` composes each package's own config dataclass into one validated
``ExperimentConfig``; ``experiments.cli`` is the ``evo`` command. Nothing is imported here so
that ``evo status`` / ``evo list`` start without torch or Ray.
"""
