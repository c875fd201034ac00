"""Side-by-side experiments: one-lever ablations and the recipe race against the AR yardstick."""
from .ablation import ablate
from .race_recipes import RECIPES, parse_recipe, race

__all__ = ["ablate", "RECIPES", "parse_recipe", "race"]
