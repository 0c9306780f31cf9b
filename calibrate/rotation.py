"""Block-diagonal rotations of a projection input, fitted from its second moment.

An input x [..., d] is cut into ``d // b`` blocks of ``b`` consecutive channels, and block k is
rotated by the orthogonal eigenvector matrix Q_k [b, b] of that block's uncentred second moment
E[x_k^T x_k]: z_k = x_k Q_k. In that basis the block's energy sits in few coordinates, so a
magnitude threshold on z drops less of x than the same threshold on x drops (LaRoSA rotates
the whole input the same way; a full d x d rotation costs as many bytes at run time as the
sparsity it buys, blocks cost d x b, see docs/quality.md). A product W x equals
``rotate_weight(W, Q) @ z``, exactly in real arithmetic.

Shapes: Q is float32 [d // b, b, b]; moments accumulate in float64 [d // b, b, b].
"""
from __future__ import annotations

import torch


def block_moment(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum over tokens of each block's outer product: x [..., d] -> float64 [d // b, b, b]."""
    d = x.shape[-1]
    xb = x.detach().reshape(-1, d // block, block).float().transpose(0, 1)  # [nb, T, b]
    return (xb.transpose(1, 2) @ xb).double()


def fit_block_rotation(moment: torch.Tensor) -> torch.Tensor:
    """Each block's eigenvectors, float32 [nb, b, b] from a block moment [nb, b, b].

    Columns in descending eigenvalue order; each column's sign is fixed so that its
    largest-magnitude entry is positive, so the result does not depend on the eigensolver.
    """
    _, vecs = torch.linalg.eigh(moment.double())
    vecs = vecs.flip(-1)
    peak = vecs.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(vecs, -2, peak).sign()
    return (vecs * torch.where(sign == 0, 1.0, sign)).float()


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """z = x Q blockwise: x [..., d] -> [..., d] in ``q``'s dtype (float32 for accuracy)."""
    nb, b, _ = q.shape
    xb = x.reshape(-1, nb, b).to(q.dtype).transpose(0, 1)  # [nb, T, b]
    return (xb @ q).transpose(0, 1).reshape(x.shape)


def unrotate(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x = z Q^T blockwise: z [..., d] -> [..., d] in ``q``'s dtype."""
    nb, b, _ = q.shape
    zb = z.reshape(-1, nb, b).to(q.dtype).transpose(0, 1)
    return (zb @ q.transpose(1, 2)).transpose(0, 1).reshape(z.shape)


def rotate_weight(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """W' = W blockdiag(Q): weight [out, d] -> float32 [out, d], so that W x = W' (x Q)."""
    return rotate(weight.float(), q.float())
