"""The synthetic world: a seeded generator of people, places and organisations, projected
into every kind of text the pipeline needs (pretraining documents, assistant conversations,
preference comparisons, evaluation probes), all with exact ground truth."""

from lmstack.world.corpus import generate, load_world, print_stats
from lmstack.world.entities import build_world

__all__ = ["build_world", "generate", "load_world", "print_stats"]
