"""Random subspace (GoLore / FLora / APOLLO style): no SVD, and nothing but the refresh count in the state.

The basis is a pure function of (seed, proj_refreshes), so it is regenerated on demand instead of being stored.

``random_style``:
  * "orthonormal" (default): Q factor of a Gaussian matrix drawn on the CPU (the same basis on every device).
  * "apollo": apollo-torch's projection matrix, bit for bit: a Gaussian divided by sqrt(rank), not orthonormal,
    drawn on the gradient's device by ``torch.randn`` from a generator seeded with the parameter's seed; the left
    side draws (m, r) and uses it as P, the right side draws (r, n) and uses its transpose as Q. The first basis
    uses ``seed + 1`` (with the engine's seeds, group seed 0, that is apollo-torch's 1-based parameter index) and
    every refresh moves to ``apollo_next_seed`` of the previous seed. No "full" side (apollo-torch has none).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import List

import torch

from .base import Projector, ProjectorError, clamp_rank, next_refresh_count, one_of, orthonormal_columns

RANDOM_STYLES = ("orthonormal", "apollo")
APOLLO_SEED_DRAWS = 15  # apollo-torch's next seed: the last of 15 int64 draws from a generator seeded with the seed


def apollo_next_seed(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (APOLLO_SEED_DRAWS,), generator=gen)[-1])


class RandomProjector(Projector):
    name = "random"
    options = {
        "random_style": (
            "orthonormal",
            one_of(*RANDOM_STYLES),
            "'orthonormal' (Q factor of a Gaussian) or 'apollo' (apollo-torch's scaled Gaussian "
            "projection, its seeds and draws exactly)",
        ),
    }
    # Refresh counts kept in the cache: rotation() needs the old and the new basis at the same time.
    _CACHED_COUNTS = 2
    uses_gradient = False  # drawn from (seed, parameter, refresh count): every rank draws the same basis

    def __init__(self, rank, side, shape, seed=0, random_style: str = "orthonormal", **options):
        super().__init__(rank, side, shape, seed, **options)
        self.random_style = self.check_option("random_style", random_style)
        if self.random_style == "apollo" and side == "full":
            raise ValueError(
                "random projector: random_style='apollo' projects one side ('left' or 'right'), "
                "apollo-torch has no 'full' projection"
            )
        self._cache: "OrderedDict[int, dict]" = OrderedDict()  # refresh count -> {(which, device): basis}
        self._apollo_seeds: List[int] = [self.seed + 1]  # seed of basis k at index k - 1
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

    def apollo_seed(self, count: int) -> int:
        """The seed apollo-torch draws basis number ``count`` (1 = the first) from."""
        while len(self._apollo_seeds) < count:
            self._apollo_seeds.append(apollo_next_seed(self._apollo_seeds[-1]))
        return self._apollo_seeds[count - 1]

    def _generate(self, count: int):
        if self.random_style == "apollo":
            gen = torch.Generator(device=self._device).manual_seed(self.apollo_seed(count))
            m, n = self.shape
            shape = (m, self.rank) if self.side == "left" else (self.rank, n)
            drawn = torch.randn(shape, generator=gen, device=self._device, dtype=torch.float32) / math.sqrt(self.rank)
            return {self.side: drawn if self.side == "left" else drawn.t()}
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

    def state_layout(self):
        return []  # only the refresh counter, a number

    def orthonormal(self, state):
        return self.random_style == "orthonormal"

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

    def overlap(self, old_state, new_state) -> float:
        """1 for the same refresh count (the same basis); otherwise the base definition on the spans (apollo
        bases are orthonormalised first). Independent draws overlap by about r / d, far below any threshold."""
        if int(old_state.get("proj_refreshes", 0)) == int(new_state.get("proj_refreshes", 0)):
            return 1.0
        values = []
        for which, _ in self.projected_dims():
            old, new = self.basis(old_state, which), self.basis(new_state, which)
            if self.random_style == "apollo":
                old, new = torch.linalg.qr(old).Q, torch.linalg.qr(new).Q
            values.append(float(old.t().matmul(new).square().sum()) / max(old.shape[1], new.shape[1]))
        return min(1.0, max(0.0, sum(values) / len(values)))
