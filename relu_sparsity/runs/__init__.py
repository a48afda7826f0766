"""A run's folder (docs/design.md §8): `reader` reads it without JAX or Flax (reports, the
command line), `folder` writes it during training and keeps its checkpoints, `metadata` says
what produced it."""
