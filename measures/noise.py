"""The attacks' random numbers; the global RNG is never touched.

Counter-based (:func:`sample_uniform`, :func:`sample_normal`): each sample's numbers are a function
of (seed, its index) only. The random starts of the robust-accuracy counts (:mod:`measures.attacks`,
:mod:`measures.apgd`) draw from here, so a sample gets the same start whatever batch or rank it is
evaluated in. Streams tell apart the independent draws of one sample (PGD's start, each APGD run's
start).

From a generator (:func:`generator_start`): the random start of the single attacks (``pgd``,
``apgd``, ``apgd_targeted``), drawn as torchattacks draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a · c) mod 2^32 for int64 ``a`` in [0, 2^32), without int64 overflow."""
    high = ((a * (c >> 16)) & 0xFFFF) << 16
    return (high + a * (c & 0xFFFF)) & _M32


def _hash32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (Wellons' lowbias32) on int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def sample_uniform(
    idx: torch.Tensor, seed: int, stream: int, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Uniform numbers in (0, 1), shape (len(idx), n), a function of (seed, idx, stream, j) only.

    Counter-based: the value for sample ``idx`` and position ``j`` is a hash of those
    integers, so it is the same whatever batch or rank the sample is in.
    """
    idx = idx.to(device=device, dtype=torch.int64)
    base = _hash32(torch.tensor((seed * 0x9E3779B9 + stream * 0x85EBCA6B) & _M32, device=device))
    key = _hash32(_hash32(base ^ (idx & _M32)) ^ ((idx >> 32) & _M32))
    pos = _hash32((torch.arange(n, device=device, dtype=torch.int64) * 0x27D4EB2F + 1) & _M32)
    bits = _hash32(key[:, None] ^ pos[None, :]) >> 8  # 24 random bits
    return (bits.to(dtype) + 0.5) * 2.0**-24


def sample_normal(
    idx: torch.Tensor, seed: int, stream: int, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Standard normal numbers, shape (len(idx), n), by Box-Muller from streams ``stream`` and ``stream + 1``."""
    u1 = sample_uniform(idx, seed, stream, n, dtype, device)
    u2 = sample_uniform(idx, seed, stream + 1, n, dtype, device)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


Unit = Callable[[torch.Tensor, Callable[[tuple[int, ...]], torch.Tensor]], torch.Tensor]


def generator_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None, unit: Unit
) -> torch.Tensor:
    """A random start ``clamp(x + eps · unit(t, uniform), 0, 1)`` drawn from ``generator``.

    ``t`` has ``x``'s shape: uniform in [-1, 1] per entry (``norm="linf"``) or standard normal
    (``"l2"``), drawn on the generator's device (a generator on ``x``'s device seeded with 0 when
    ``None``) and moved to ``x``'s. ``unit(t, uniform)`` makes the attack's perturbation for eps = 1
    out of it; ``uniform(shape)`` draws further numbers in [0, 1) from the same generator, after ``t``
    (PGD's L2 radius).
    """
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    kw = {"generator": generator, "device": generator.device, "dtype": x.dtype}
    t = torch.rand(x.shape, **kw) * 2 - 1 if norm == "linf" else torch.randn(x.shape, **kw)

    def uniform(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, **kw).to(x.device)

    return (x + eps * unit(t.to(x.device), uniform)).clamp(0, 1)
