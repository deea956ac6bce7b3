"""Training and evaluation: the loop, the recipe, distributed plumbing, the run directory."""
