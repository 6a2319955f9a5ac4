"""Per-layer (block) curvature: the diagonal blocks of any curvature operator, in one measurement.

A block is a subset of the parameters (a module's, or those whose names match a pattern); its
diagonal block ``A_BB`` is the curvature with every other parameter held fixed.
:class:`BlockOperator` restricts any :class:`~measures.operators.LinearOperator` to it (a product
embeds the vector with zeros elsewhere and keeps the block's part of the full product, so it
costs one full product and runs the same collectives on every rank), and
:func:`block_spectra` measures, for every block, its top eigenvalue (Lanczos) and its trace: the
traces of all blocks come from the same Hutchinson samples of the full operator
(``tr A_BB = E[Σ_{i∈B} z_i (A z)_i]``).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from measures.linalg import lanczos_eigenvalues
from measures.operators import Counted, LinearOperator, rademacher, seeded_generator

__all__ = ["BlockOperator", "block_spectra", "parameter_blocks"]


def _strip_common(names: list[str]) -> list[str]:
    """Drop the leading dotted components every name shares (``net.conv1`` -> ``conv1``)."""
    parts = [n.split(".") for n in names]
    while len(parts) > 1 and all(len(p) > 1 and p[0] == parts[0][0] for p in parts):
        parts = [p[1:] for p in parts]
    return [".".join(p) for p in parts]


def parameter_blocks(model: nn.Module, spec: str | dict | list) -> dict[str, torch.Tensor]:
    """The blocks as indices into the flat vector of ``model``'s trainable parameters.

    ``spec``: ``"module"`` (one block per module that owns parameters, named by its path without
    the prefix all share, e.g. ``conv1``); a dict ``{name: regex}`` (a block per name: the
    parameters whose full name matches the regex, ``re.search``; the first match wins); or a
    list of regexes (each its own name). Parameters in no block are left out; an empty block is
    refused (it names the pattern).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offsets = torch.tensor([0] + [p.numel() for _, p in named]).cumsum(0).tolist()
    ranges = {n: torch.arange(offsets[i], offsets[i + 1]) for i, (n, _) in enumerate(named)}
    if spec == "module":
        owners = [n.rsplit(".", 1)[0] if "." in n else "root" for n, _ in named]
        short = dict(zip(dict.fromkeys(owners), _strip_common(list(dict.fromkeys(owners))), strict=True))
        out: dict[str, list[torch.Tensor]] = {}
        for (n, _), owner in zip(named, owners, strict=True):
            out.setdefault(short[owner], []).append(ranges[n])
        return {k: torch.cat(v) for k, v in out.items()}
    if isinstance(spec, list | tuple):
        spec = {str(p): p for p in spec}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(
            f"blocks must be 'module', a list of patterns or a dict name -> pattern, got {spec!r}"
        )
    groups: dict[str, list[torch.Tensor]] = {k: [] for k in spec}
    for n, _ in named:
        for key, pattern in spec.items():
            if re.search(str(pattern), n):
                groups[key].append(ranges[n])
                break
    empty = [f"{k} ({spec[k]!r})" for k, v in groups.items() if not v]
    if empty:
        raise ValueError(
            f"blocks match no trainable parameter: {', '.join(empty)}; names: {[n for n, _ in named]}"
        )
    return {k: torch.cat(v) for k, v in groups.items()}


class BlockOperator:
    """The diagonal block ``A[index][:, index]`` of ``op`` (the other parameters fixed)."""

    def __init__(self, op: LinearOperator, index: torch.Tensor) -> None:
        self.op, self.index = op, index.to(op.device)
        self.dim, self.device = len(index), op.device
        self.dtype = getattr(op, "dtype", torch.float64)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.dim, dtype=v.dtype, device=v.device)
        full[self.index.to(v.device)] = v
        return self.op.matvec(full)[self.index.to(v.device)]


def block_spectra(
    op: LinearOperator,
    blocks: dict[str, torch.Tensor],
    *,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    trace: bool = False,
    trace_rtol: float = 0.05,
    min_samples: int = 10,
    max_samples: int = 100,
) -> dict[str, dict[str, float]]:
    """Per block: ``lambda_1..k`` (Lanczos on :class:`BlockOperator`, the same stop as the full
    operator's), ``rel_error``, ``converged``; with ``trace``: ``trace`` and ``trace_stderr`` from
    shared Hutchinson samples, drawn until every block's standard error is ``<= trace_rtol ·
    |tr A|`` (the full trace: blocks are compared on one scale) or ``max_samples``; and ``n_hvp``
    (products of the full operator, all blocks). Rank-independent as the solvers are.
    """
    out: dict[str, dict[str, float]] = {}
    n_hvp = 0
    for name, index in blocks.items():
        res = lanczos_eigenvalues(
            BlockOperator(op, index), min(k, len(index)), tol=tol, max_iter=max_iter, seed=seed
        )
        n_hvp += res.n_hvp
        out[name] = {f"lambda_{i + 1}": v for i, v in enumerate(res.eigenvalues.tolist())}
        out[name] |= {"rel_error": res.rel_error, "converged": float(res.converged)}
    if trace:
        gen, matvec = seeded_generator(seed), Counted(op)
        samples: list[torch.Tensor] = []  # per draw: (n_blocks + 1,) the blocks' and the full sample
        while len(samples) < max_samples:
            z = rademacher(gen, (op.dim,), op.device)
            zhz = z * matvec(z)
            samples.append(
                torch.stack([zhz[i.to(zhz.device)].sum() for i in blocks.values()] + [zhz.sum()]).cpu()
            )
            s = torch.stack(samples)
            if len(s) >= min_samples and bool(
                (s.std(0)[:-1] / math.sqrt(len(s)) <= trace_rtol * s[:, -1].mean().abs()).all()
            ):
                break
        s = torch.stack(samples)
        stderr = s.std(0) / math.sqrt(len(s))
        for j, name in enumerate(blocks):
            out[name] |= {"trace": float(s[:, j].mean()), "trace_stderr": float(stderr[j])}
        n_hvp += matvec.calls
    for name in out:
        out[name]["n_hvp"] = float(n_hvp)
    return out
