"""The Mosaic GPU backend (Hopper): `kernel.py` (the Pallas Mosaic-GPU kernel) and `ops.py`
(padding, dtype policy, the small reductions of its partial statistics, `live`). Importing this
package imports only JAX; `ops.mosaic_gpu_forward` is the backend forward."""
