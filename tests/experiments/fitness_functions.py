"""fitness.function examples for the tests: imported by the member processes."""
from __future__ import annotations


def fails_on_negative_first_weight(model, batches, device) -> float:
    """Raises for a model whose first output weight is negative (some members, not all, for a
    given seed); else the mean held-out loss's first batch size, a plain number."""
    first = float(model.output.weight.flatten()[0])
    if first < 0:
        raise ValueError(f"first output weight {first:.4f} is negative")
    return float(sum(len(b) for b in batches.values()))
