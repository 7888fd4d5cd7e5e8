"""Reordering the channels between two Linears so that each weight group holds channels of like size.

Group-wise weight quantization gives every run of ``group_size`` input channels one scale per output row,
set by the group's largest weight. After equalization (``W * s``) a few channels with large scales make the
largest weights of their groups, and the other channels of those groups lose most of their levels. Where
the input channels are the output rows of other Linears combined element by element (gate/up -> down),
permuting those rows and the consumer's input columns the same way changes nothing in the layer's function,
and sorting the channels by size puts the large ones together in a few groups.
"""
from __future__ import annotations

import torch

__all__ = ["channel_order", "permute_linear_inputs", "permute_linear_outputs", "permute_square"]


def channel_order(weights: list[torch.Tensor], scales: torch.Tensor | None = None) -> torch.Tensor:
    """The permutation (``[K]`` int64) that sorts the input channels of ``weights`` (``[N_i, K]`` each, sharing
    their input) by decreasing root-mean-square over every output row; ties keep their order. With ``scales``
    (``[K]``): the order of the scaled weights ``W * scales``, each scaled copy made and dropped in turn."""
    if not weights:
        raise ValueError("channel_order needs at least one weight matrix")
    k = weights[0].shape[1]
    if any(w.shape[1] != k for w in weights):
        raise ValueError(f"the weights sharing an input must have the same number of columns, got "
                         f"{[tuple(w.shape) for w in weights]}")
    scaled = (w.float() if scales is None else w.float() * scales.view(1, -1) for w in weights)
    sq = sum(w.pow(2).sum(dim=0) for w in scaled)
    return torch.argsort(sq, descending=True, stable=True)


def permute_linear_inputs(linear: torch.nn.Linear, perm: torch.Tensor) -> None:
    """Reorder the input columns of ``linear.weight`` by ``perm`` (in place: column ``j`` becomes old column
    ``perm[j]``)."""
    with torch.no_grad():
        linear.weight.copy_(linear.weight.index_select(1, perm.to(linear.weight.device)))


def permute_linear_outputs(linear: torch.nn.Linear, perm: torch.Tensor) -> None:
    """Reorder the output rows (and bias entries) of ``linear`` by ``perm`` (in place)."""
    with torch.no_grad():
        p = perm.to(linear.weight.device)
        linear.weight.copy_(linear.weight.index_select(0, p))
        if linear.bias is not None:
            linear.bias.copy_(linear.bias.index_select(0, p))


def permute_square(h: torch.Tensor, perm: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``h[perm][:, perm]`` for a ``[K, K]`` matrix, written into ``h`` itself (one chunk of rows of temporary
    storage beside it: a Hessian is the largest buffer of a layer)."""
    p = perm.to(h.device)
    k = h.shape[0]
    for i in range(0, k, chunk):  # the columns first, row block by row block
        h[i:i + chunk] = h[i:i + chunk].index_select(1, p)
    # then the rows: a gather of rows cannot be done block by block in place, so follow the permutation's cycles
    done = [False] * k
    pl = p.tolist()
    tmp = torch.empty(k, dtype=h.dtype, device=h.device)
    for start in range(k):
        if done[start] or pl[start] == start:
            done[start] = True
            continue
        tmp.copy_(h[start])
        j = start
        while True:
            done[j] = True
            nxt = pl[j]
            if nxt == start:
                h[j].copy_(tmp)
                break
            h[j].copy_(h[nxt])
            j = nxt
    return h
