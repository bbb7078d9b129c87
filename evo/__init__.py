"""The algorithm half of evo: search space, genomes, operators, strategies.

Imports neither torch nor ray (optuna only lazily), so it runs and tests anywhere.
"""

from evo.genome import Genome, diff, format_diff
from evo.space import ChoiceGene, FloatGene, IntGene, SearchSpace, SpaceError

__all__ = [
    "ChoiceGene",
    "FloatGene",
    "Genome",
    "IntGene",
    "SearchSpace",
    "SpaceError",
    "diff",
    "format_diff",
]
