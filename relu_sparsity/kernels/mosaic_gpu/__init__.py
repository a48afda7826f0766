"""The Mosaic GPU backend (Hopper): `kernel.py` (the Pallas Mosaic-GPU kernel) and `ops.py` (the
backend forward: padding, dtype policy and the small JAX steps after the kernel). Importing this
package imports only JAX."""
