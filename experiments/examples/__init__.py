"""Worked examples of user code that a config names (e.g. ``fitness.function``)."""
