"""The Ray side of evo: member actors, the driver's round loop, the run store, status and replay.

Only this package imports ray. Import what you need from its modules (``population.driver``,
``population.store`` …); this file stays empty so that ``evo status`` does not pay for ray.
"""
