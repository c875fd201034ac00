"""Side-by-side experiments: one-lever ablations and the recipe race against the AR yardstick."""
from .ablation import ablate
from .race_recipes import EQUALS, RECIPES, YARDSTICK, parse_recipe, race

__all__ = ["ablate", "EQUALS", "RECIPES", "YARDSTICK", "parse_recipe", "race"]
