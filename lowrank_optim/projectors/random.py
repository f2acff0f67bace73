"""Random orthonormal subspace (GoLore / FLora style): no SVD, and nothing but the refresh count in the state.

The basis is a pure function of (seed, proj_refreshes), so it is regenerated on demand instead of being stored."""
from __future__ import annotations

from collections import OrderedDict

import torch

from .base import Projector, ProjectorError, clamp_rank, next_refresh_count, orthonormal_columns


class RandomProjector(Projector):
    name = "random"
    # Refresh counts kept in the cache: rotation() needs the old and the new basis at the same time.
    _CACHED_COUNTS = 2

    def __init__(self, rank, side, shape, seed=0, **options):
        super().__init__(rank, side, shape, seed, **options)
        self._cache: "OrderedDict[int, dict]" = OrderedDict()  # refresh count -> {(which, device): basis}
        # basis() gets no tensor to take a device from; use the one of the last gradient seen.
        self._device = torch.device("cpu")

    def refresh(self, state, grad):
        self._device = grad.device
        new = next_refresh_count(state)
        for which, _ in self.projected_dims():
            self.basis(new, which)  # generate now, so a failure surfaces here as ProjectorError
        return new

    def project(self, state, grad):
        self._device = grad.device
        return super().project(state, grad)

    def project_back(self, state, low):
        self._device = low.device
        return super().project_back(state, low)

    def _generate(self, count: int):
        # Drawn on the CPU so the basis is the same on every device; left before right, always both, so the
        # numbers do not depend on which side is asked for first.
        gen = self.generator({"proj_refreshes": count}, torch.device("cpu"))
        out = {}
        for which, size in (("left", self.shape[0]), ("right", self.shape[1])):
            if self.side in (which, "full"):
                r = clamp_rank(self.rank, size)
                try:
                    out[which] = orthonormal_columns(torch.randn(size, r, generator=gen))
                except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
                    raise ProjectorError(f"{self.name}: QR failed ({err})") from err
        return out

    def expected_state_bytes(self) -> int:
        return 0  # only the refresh counter, a number

    def basis(self, state, which):
        count = int(state.get("proj_refreshes", 0))
        entry = self._cache.setdefault(count, {})
        self._cache.move_to_end(count)
        while len(self._cache) > self._CACHED_COUNTS:
            self._cache.popitem(last=False)
        key = (which, self._device)
        if key not in entry:
            for side, q in self._generate(count).items():
                entry[(side, self._device)] = q.to(self._device)
        return entry[key]
