"""Orthogonal transforms with Kronecker structure: randomized Hadamard rotations for any size.

A size n is split as n = m * 2**k with m odd. The power-of-2 part is a Sylvester-Hadamard matrix, itself applied
as a Kronecker product of Hadamard factors of at most `MAX_FACTOR` (H_a ⊗ H_b = H_ab for Sylvester matrices), so no
n x n matrix is ever built. An odd part m > 1 has no Hadamard matrix (those exist only for 1, 2 and multiples of 4),
so it gets the orthonormal DCT-II of size m: deterministic, dense, and like a Hadamard matrix it spreads one channel
over all m outputs (every entry has magnitude <= sqrt(2/m)). LLaMA-7B's 11008 = 43 x 256 becomes DCT_43 ⊗ H_256,
LLaMA-13B's 13824 = 27 x 512 becomes DCT_27 ⊗ H_512. QuaRot instead stores hand-made Hadamard matrices of orders
such as 172 = 4 x 43; both are orthogonal and incoherent, the DCT needs no table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

MAX_FACTOR = 256


def sylvester_hadamard(n: int) -> torch.Tensor:
    """Normalised (orthogonal) Hadamard matrix of a power-of-2 size, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-2 size, got {n}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix / math.sqrt(n)


def dct_matrix(m: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix of size m (rows are frequencies), float64."""
    k = torch.arange(m, dtype=torch.float64)[:, None]
    i = torch.arange(m, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * m)) * math.sqrt(2 / m)
    matrix[0] /= math.sqrt(2)
    return matrix


def orthogonal_factors(n: int) -> list[torch.Tensor]:
    """Orthogonal float64 factors whose Kronecker product (in order) is an n x n incoherent orthogonal matrix."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    power = n & -n  # largest power of 2 dividing n
    odd = n // power
    factors = [dct_matrix(odd)] if odd > 1 else []
    while power > 1:
        size = min(power, MAX_FACTOR)
        factors.append(sylvester_hadamard(size))
        power //= size
    return factors


@dataclass
class KroneckerRotation:
    """An orthogonal Q = diag(signs) · (F_1 ⊗ ... ⊗ F_k) acting on the last dim of row vectors (x -> x Q).

    A factor of None is an identity block of that size (e.g. "the same rotation inside every head").
    Factor matrices are cached per device and dtype; the cache is written whole, so concurrent callers are safe.
    """

    sizes: tuple[int, ...]
    factors: tuple[torch.Tensor | None, ...]
    signs: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    # instances are shared (lru_cache): one per size and seed, so every layer reuses the same device matrices
    @classmethod
    @functools.lru_cache(maxsize=64)
    def hadamard(cls, n: int, seed: int | None = None) -> KroneckerRotation:
        """Hadamard-like rotation of size n; with a seed, randomized by ±1 signs drawn from it (CPU generator)."""
        # shared across calls: tensors made inside `torch.inference_mode` could never take part in autograd later
        with torch.inference_mode(False):
            factors = tuple(orthogonal_factors(n)) or (torch.ones(1, 1, dtype=torch.float64),)
            signs = None
            if seed is not None:
                generator = torch.Generator().manual_seed(seed)
                signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return cls(tuple(f.shape[0] for f in factors), factors, signs)

    @classmethod
    @functools.lru_cache(maxsize=64)
    def blockwise(cls, blocks: int, block_size: int, across: bool) -> KroneckerRotation:
        """``across``: H_blocks ⊗ I (mixes blocks, e.g. heads); else I ⊗ H_block_size (within every block)."""
        inner = cls.hadamard(blocks if across else block_size)
        if across:
            return cls((*inner.sizes, block_size), (*inner.factors, None))
        return cls((blocks, *inner.sizes), (None, *inner.factors))

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            with torch.inference_mode(False):  # cached for later calls, which may need autograd (as in `hadamard`)
                factors = tuple(None if f is None else f.to(device=device, dtype=dtype) for f in self.factors)
                signs = None if self.signs is None else self.signs.to(device=device, dtype=dtype)
            cached = self._cache[key] = (factors, signs)
        return cached

    def apply(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x Q (or x Qᵀ) over the last dim, computed in x's dtype."""
        if x.shape[-1] != self.size:
            raise ValueError(f"rotation of size {self.size} applied to a last dim of {x.shape[-1]}")
        factors, signs = self._matrices(x.device, x.dtype)
        if signs is not None and not transpose:
            x = x * signs
        lead = x.shape[:-1]
        y = x.reshape(*lead, *self.sizes)
        for offset, matrix in enumerate(factors):
            if matrix is None:
                continue
            dim = len(lead) + offset
            y = (y.movedim(dim, -1) @ (matrix.T if transpose else matrix)).movedim(-1, dim)
        y = y.reshape(*lead, self.size)
        if signs is not None and transpose:
            y = y * signs
        return y

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The full matrix Q (tests and small sizes only)."""
        return self.apply(torch.eye(self.size, dtype=dtype))
