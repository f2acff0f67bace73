"""Exact top-r singular vectors of the gradient (GaLore's projector)."""
from __future__ import annotations

import torch

from .base import Projector, ProjectorError, check_finite, next_refresh_count


def truncated_svd(grad: torch.Tensor, rank: int, name: str = "svd"):
    """Top-``rank`` (U, S, Vh) of ``grad`` in fp32; a LinAlgError becomes ProjectorError."""
    try:
        u, s, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ProjectorError(f"{name}: SVD failed to converge ({err})") from err
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    check_finite(name, u, vh)
    return u, s, vh


class SVDProjector(Projector):
    name = "svd"

    def refresh(self, state, grad):
        u, _, vh = truncated_svd(grad, self.rank, self.name)
        return self._store(state, u, vh)

    def _store(self, state, u, vh):
        new = next_refresh_count(state)
        if self.side in ("left", "full"):
            new["proj_left"] = u.contiguous()
        if self.side in ("right", "full"):
            new["proj_right"] = vh.t().contiguous()
        return new

    def basis(self, state, which):
        return state["proj_" + which]
