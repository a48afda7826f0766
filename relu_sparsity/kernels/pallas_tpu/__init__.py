"""The `pallas_tpu` backend: a Pallas kernel for TPUs, interpreted (with a warning) elsewhere."""
