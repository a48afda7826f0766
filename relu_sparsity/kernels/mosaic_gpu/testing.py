"""Small tile configurations of the mosaic_gpu kernel for Mosaic GPU's interpreter and the
fingerprint script: each exercises one schedule at a size the interpreter runs in seconds."""

import dataclasses

from relu_sparsity.kernels.mosaic_gpu.kernel import TileConfig

# CTA 128 x 128 (two 64 x 128 warpgroup tiles along M).
SMALL = TileConfig(tile_m=64, tile_n=128, tile_k=64, stages=2, wg_dim="m", epi_tile_n=64)
# Two warpgroups side by side along N, 64-wide column tiles (2 mask words per tile).
SMALL_N = TileConfig(tile_m=64, tile_n=64, tile_k=64, stages=2, wg_dim="n", epi_tile_n=32,
                     grid_minor="n", grid_tile_width=2)
# Ping-pong: each warpgroup takes whole 64 x 128 tiles in turn, through one 2-stage ring.
SMALL_PP = TileConfig(tile_m=64, tile_n=128, tile_k=64, stages=2, wg_dim="pingpong",
                      epi_tile_n=64)
# ... a 3-stage ring: with 2 or 3 steps per tile, a stage's owner changes irregularly.
SMALL_PP3 = dataclasses.replace(SMALL_PP, stages=3)
