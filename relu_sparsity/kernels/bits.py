"""Bit-packed unit masks: unit j is bit j % 32 (LSB first) of uint32 word j // 32.

JAX versions run inside jitted code (the reference backend, the batch OR); NumPy versions run on
the host over fetched statistics (metrics, mask files). Padding bits past F are always zero.
"""

import jax
import jax.numpy as jnp
import numpy as np

BITS_PER_WORD = 32


def num_words(num_units: int) -> int:
    """W = ceil(F / 32): words needed for F units."""
    return (num_units + BITS_PER_WORD - 1) // BITS_PER_WORD


def pack_bits(used: jax.Array) -> jax.Array:
    """bool [..., F] -> uint32 [..., ceil(F / 32)]."""
    num_units = used.shape[-1]
    pad = num_words(num_units) * BITS_PER_WORD - num_units
    bits = jnp.pad(used.astype(jnp.uint32), [(0, 0)] * (used.ndim - 1) + [(0, pad)])
    bits = bits.reshape(*used.shape[:-1], -1, BITS_PER_WORD)
    shifts = jnp.arange(BITS_PER_WORD, dtype=jnp.uint32)
    # Distinct bits: their sum is their OR, and sum is a reduction every backend has for uint32.
    return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def unpack_bits(words: jax.Array, num_units: int) -> jax.Array:
    """uint32 [..., W] -> bool [..., F]."""
    shifts = jnp.arange(BITS_PER_WORD, dtype=jnp.uint32)
    bits = (words[..., None] >> shifts) & jnp.uint32(1)
    return bits.reshape(*words.shape[:-1], -1)[..., :num_units].astype(bool)


def popcount(words: jax.Array) -> jax.Array:
    """Number of set bits over the last axis: uint32 [..., W] -> int32 [...]."""
    return jnp.sum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)


def or_rows(words: jax.Array) -> jax.Array:
    """OR over the leading axis: uint32 [n, W] -> [W] (sequence masks -> batch mask)."""
    return jax.lax.reduce(words, jnp.uint32(0), jax.lax.bitwise_or, (0,))


def np_pack_bits(used: np.ndarray) -> np.ndarray:
    """Host version of `pack_bits`."""
    used = np.asarray(used, dtype=bool)
    num_units = used.shape[-1]
    pad = num_words(num_units) * BITS_PER_WORD - num_units
    padded = np.pad(used, [(0, 0)] * (used.ndim - 1) + [(0, pad)])
    packed = np.packbits(padded, axis=-1, bitorder="little")  # bytes, LSB first
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def np_unpack_bits(words: np.ndarray, num_units: int) -> np.ndarray:
    """Host version of `unpack_bits`."""
    words = np.ascontiguousarray(np.asarray(words, dtype="<u4"))
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :num_units].astype(bool)


def np_popcount(words: np.ndarray) -> np.ndarray:
    """Host version of `popcount`: int64 [...]."""
    words = np.ascontiguousarray(np.asarray(words, dtype="<u4"))
    return np.unpackbits(words.view(np.uint8), axis=-1).sum(axis=-1, dtype=np.int64)


def np_or_rows(words: np.ndarray) -> np.ndarray:
    """Host version of `or_rows`."""
    return np.bitwise_or.reduce(np.asarray(words, dtype=np.uint32), axis=0)
