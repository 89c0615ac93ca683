"""Command-line experiments: thin Hydra entry points over the library."""
