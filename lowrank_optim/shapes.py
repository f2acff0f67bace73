"""Shapes: how a parameter is seen as a matrix and which side of it is projected."""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def side_for(shape: Tuple[int, int], proj_type: str) -> str:
    """Which side to project, from the WEIGHT's shape (never from a projected tensor's shape)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def matrix_shape(p: torch.Tensor) -> Tuple[int, int]:
    """Weights with more than two dims (conv) are treated as (out, prod(rest)); vectors as (1, n)."""
    return (p.shape[0], p.numel() // max(p.shape[0], 1)) if p.dim() >= 2 else (1, p.numel())


def projected_dim(group: Dict, shape: Tuple[int, int]) -> int:
    """Size of the side the subspace is chosen in (density is a fraction of it)."""
    side = side_for(shape, group["proj_type"])
    return {"left": shape[0], "right": shape[1]}.get(side, min(shape))


def density_rank(density: float, dim: int) -> int:
    """r = round(density * dim), at least 1 unless density is exactly 0 (then nothing is in the subspace)."""
    r = round(density * dim)
    return max(1, r) if density > 0 else 0


__all__ = ["side_for", "matrix_shape", "projected_dim", "density_rank"]
