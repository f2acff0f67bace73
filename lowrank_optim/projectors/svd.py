"""Exact top-r singular vectors of the gradient (GaLore's projector).

Shared by every projector that stores an explicit basis (svd, rsvd, power, sst): the basis can be stored
blockwise-quantized (``basis_bits``, see ``basis_quant``) and each new basis gets canonical signs (``basis_sign``)."""

from __future__ import annotations

import torch

from .base import Projector, ProjectorError, canonical_signs, check_finite, next_refresh_count, one_of
from .basis_quant import BASIS_BITS, basis_layout, decode_basis, encode_basis, has_basis

BASIS_SIGNS = ("align", "none")


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
    options = {
        "basis_bits": (
            32,
            one_of(*BASIS_BITS),
            "bits per stored basis entry: 32 (fp32), 8 (blockwise dynamic 8-bit) or 4 (blockwise int4)",
        ),
        "basis_sign": (
            "align",
            one_of(*BASIS_SIGNS),
            "'align': each new basis vector takes the sign of the previous one it continues (else its "
            "largest entry is positive); 'none': the factorisation's raw signs (galore-torch parity)",
        ),
    }

    def __init__(self, rank, side, shape, seed=0, basis_bits: int = 32, basis_sign: str = "align", **options):
        super().__init__(rank, side, shape, seed, **options)
        self.basis_bits = self.check_option("basis_bits", basis_bits)
        self.basis_sign = self.check_option("basis_sign", basis_sign)

    def refresh(self, state, grad):
        u, _, vh = truncated_svd(grad, self.rank, self.name)
        return self._store(state, u, vh)

    def basis_width(self) -> int:
        """Columns of the stored basis: the SVD family clamps the rank to min(m, n)."""
        return max(1, min(self.rank, *self.shape))

    def previous_basis(self, state, which):
        """The basis a refresh replaces (fp32), or None before the first one."""
        if not has_basis(state, "proj_" + which):
            return None
        return self.basis(state, which)

    def _store(self, state, u, vh):
        """New state entries for the left basis ``u`` (m x r) and right basis ``vh^T`` (n x r), for the sides this
        projector projects (the other may be None), with canonical signs and in the ``basis_bits`` format."""
        new = next_refresh_count(state)
        for which, b in (("left", u), ("right", None if vh is None else vh.t())):
            if self.side not in (which, "full"):
                continue
            if self.basis_sign == "align":
                b = canonical_signs(b, self.previous_basis(state, which))
            new.update(encode_basis("proj_" + which, b.contiguous(), self.basis_bits))
        return new

    def orthonormal(self, state):
        return all("proj_" + which in state for which, _ in self.projected_dims())  # fp32: not quantized

    def basis(self, state, which):
        size = self.shape[0] if which == "left" else self.shape[1]
        return decode_basis(state, "proj_" + which, (size, self.basis_width()))

    def state_layout(self):
        width = self.basis_width()
        return [t for _, size in self.projected_dims() for t in basis_layout((size, width), self.basis_bits)]
