"""Hadamard matrices (fptq.quant.hadamard): H @ H.T = n I for every order a real model needs, entries +-1,
the randomized transform orthogonal and flat, and a clear refusal where no construction is known."""
from __future__ import annotations

import math

import pytest
import torch

from fptq.quant.hadamard import (
    hadamard_kron_factors,
    hadamard_matrix,
    hadamard_order_factors,
    is_prime,
    kron_apply,
    paley_i,
    paley_ii,
    random_hadamard,
    random_hadamard_factors,
    sylvester,
)


def _is_hadamard(h: torch.Tensor) -> bool:
    n = h.shape[0]
    return bool(torch.all(h.abs() == 1)) and torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 31, 43])
def test_paley_i_is_hadamard(q):
    assert _is_hadamard(paley_i(q))


@pytest.mark.parametrize("q", [5, 13, 17, 29, 37])
def test_paley_ii_is_hadamard(q):
    assert _is_hadamard(paley_ii(q))


# hidden, intermediate and head sizes of SmolLM2-135M, Qwen2.5-0.5B, LLaMA-7B/13B and friends
@pytest.mark.parametrize("n", [1, 2, 4, 12, 64, 128, 576, 896, 1536, 4864, 5120, 3584, 1024])
def test_hadamard_of_model_sizes(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and _is_hadamard(h)


def test_order_factors_prefer_the_smallest_paley_base():
    assert hadamard_order_factors(576) == (36, 16)
    assert hadamard_order_factors(896) == (28, 32)
    assert hadamard_order_factors(4096) == (1, 4096)
    assert hadamard_order_factors(6) is None  # no Hadamard matrix of order 6 exists


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)
    with pytest.raises(ValueError, match="Paley I needs"):
        paley_i(13)
    with pytest.raises(ValueError, match="Paley II needs"):
        paley_ii(7)
    with pytest.raises(ValueError, match="order 10"):
        hadamard_matrix(10)
    assert [q for q in range(20) if is_prime(q)] == [2, 3, 5, 7, 11, 13, 17, 19]


def test_random_hadamard_is_orthogonal_flat_and_seeded():
    r = random_hadamard(576, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(r.abs(), torch.full_like(r, 1 / math.sqrt(576)))
    assert torch.equal(r, random_hadamard(576, seed=3))
    assert not torch.equal(r, random_hadamard(576, seed=4))
    # one outlier channel is spread evenly over every channel
    x = torch.zeros(576, dtype=torch.float64)
    x[5] = 100.0
    y = x @ r
    assert torch.allclose(y.abs(), torch.full_like(y, 100 / math.sqrt(576)))


@pytest.mark.parametrize("n", [1, 4, 64, 576, 896, 2048, 4096, 5120])
def test_kronecker_factors_rebuild_the_matrix_and_multiply_like_it(n):
    """The factored product (what the rotation of a 7B model's weights runs: 4096 = 64 x 64, 32x fewer
    operations) is the dense matrix's: the factors' Kronecker product is the Hadamard matrix bit for bit, the
    randomized one's scale gives back its bits, and the products agree to float64 rounding."""
    factors = hadamard_kron_factors(n)
    assert all(f.shape[0] <= max(64, hadamard_order_factors(n)[0]) for f in factors)
    dense = factors[0]
    for f in factors[1:]:
        dense = torch.kron(dense, f)
    assert torch.equal(dense, hadamard_matrix(n))
    scale, factors = random_hadamard_factors(n, seed=5)
    r = random_hadamard(n, seed=5)
    assert torch.equal(scale.view(-1, 1) * dense, r)
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    got = kron_apply(x * scale, factors)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x @ r, rtol=0, atol=1e-12 * float(x.abs().max()) * math.sqrt(n))
