"""Hadamard matrices and the random orthogonal rotations built from them (QuaRot / SpinQuant style).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T = n * I``; ``H / sqrt(n)`` is orthogonal
and spreads any one channel evenly over all ``n``, which is what flattens activation outliers. Hidden sizes of
real models are rarely powers of two (SmolLM2: 576 = 36 x 16, Qwen2.5-0.5B: 896 = 28 x 32), so an order is
built as a Kronecker product of Sylvester's power-of-two matrix with one of Paley's constructions:

* Paley I, for a prime ``q = 3 (mod 4)``: order ``q + 1`` (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...);
* Paley II, for a prime ``q = 1 (mod 4)``: order ``2 (q + 1)`` (12, 28, 36, 60, 76, 108, ...).

Both come from the Jacobsthal matrix ``Q[i, j] = chi(j - i)`` of the quadratic character ``chi`` modulo ``q``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["is_prime", "sylvester", "paley_i", "paley_ii", "hadamard_order_factors", "hadamard_matrix",
           "random_hadamard", "hadamard_kron_factors", "random_hadamard_factors", "kron_apply"]

#: the largest Sylvester factor :func:`hadamard_kron_factors` keeps whole (4096 = 64 x 64)
MAX_SYLVESTER_FACTOR = 64


def is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), float64 +-1."""
    if not _power_of_two(n):
        raise ValueError(f"Sylvester's construction needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, ``chi`` the quadratic character modulo the prime ``q`` (``chi(0) = 0``)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx.view(1, -1) - idx.view(-1, 1)) % q]


def paley_i(q: int) -> torch.Tensor:
    """Paley's first construction: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    if not (is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 (mod 4), not {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley_ii(q: int) -> torch.Tensor:
    """Paley's second construction: a Hadamard matrix of order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``."""
    if not (is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 (mod 4), not {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


def _base(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` from Paley I or II with a prime ``q``, or None."""
    if order in (1, 2):
        return sylvester(order)
    q = order - 1
    if is_prime(q) and q % 4 == 3:
        return paley_i(q)
    if order % 2 == 0:
        q = order // 2 - 1
        if is_prime(q) and q % 4 == 1:
            return paley_ii(q)
    return None


def hadamard_order_factors(n: int) -> tuple[int, int] | None:
    """``(base, power)`` with ``base * power == n``, ``power`` a power of two and ``base`` an order that
    :func:`hadamard_matrix` builds from Paley (the smallest such base), or None when there is none."""
    if n < 1:
        return None
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    while power >= 1:
        base = n // power
        if _base(base) is not None:
            return base, power
        power //= 2
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries +-1, ``H @ H.T == n * I``): Sylvester's order times
    a Paley one. Raises ValueError for orders it cannot build (every order is a multiple of 4 above 2; not
    every multiple of 4 is covered)."""
    f = hadamard_order_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley (prime q); a rotation of that "
                         "size needs another construction")
    base, power = f
    return torch.kron(_base(base), sylvester(power))


def _signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``[n, n]`` float64 matrix ``diag(signs) @ H / sqrt(n)``, the signs drawn with ``seed``: a
    randomized Hadamard transform. Every row and column has entries of magnitude ``1 / sqrt(n)``."""
    return _signs(n, seed).view(-1, 1) * hadamard_matrix(n) / math.sqrt(n)


def hadamard_kron_factors(n: int) -> list[torch.Tensor]:
    """Small Hadamard matrices whose Kronecker product is :func:`hadamard_matrix` ``(n)`` exactly: the Paley
    base (when not 1) and Sylvester's power of two split into factors of at most ``MAX_SYLVESTER_FACTOR``
    (Sylvester's matrix of order ``2^(a+b)`` is the Kronecker product of those of orders ``2^a`` and ``2^b``).
    Raises ValueError where :func:`hadamard_matrix` does."""
    f = hadamard_order_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester x Paley (prime q)")
    base, power = f
    out = [_base(base)] if base > 1 else []
    while power > 1:
        piece = min(power, MAX_SYLVESTER_FACTOR)
        out.append(sylvester(piece))
        power //= piece
    return out or [sylvester(1)]


def random_hadamard_factors(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`random_hadamard` ``(n, seed)`` as ``(scale, factors)``: the matrix is ``diag(scale) @ kron(*factors)``
    with ``scale = signs / sqrt(n)`` (the same signs) and ``factors`` from :func:`hadamard_kron_factors`, so that
    :func:`kron_apply` multiplies by it in ``n * sum(orders)`` operations per row instead of ``n * n``."""
    return _signs(n, seed) / math.sqrt(n), hadamard_kron_factors(n)


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x @ kron(*factors)`` for rows ``x`` ``[..., n]`` (``n`` the product of the factors' orders), one factor at a
    time along its own axis of ``x`` viewed as ``[..., d_1, ..., d_m]`` (row-major: Kronecker indexing)."""
    sizes = [int(f.shape[0]) for f in factors]
    lead = x.shape[:-1]
    y = x.reshape(-1, *sizes)
    for t, f in enumerate(factors):
        y = torch.movedim(torch.movedim(y, t + 1, -1) @ f.to(y.dtype), -1, t + 1)
    return y.reshape(*lead, -1)
