"""Recipes: flat, readable training scripts over the qtune library. Copy one with `qtune cp sft my_sft.py`."""
