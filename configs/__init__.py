"""Training configs: `common.py` holds every field with its default, the others are recipes."""
