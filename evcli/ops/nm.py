"""N:M sparsity along the input-channel (reduction) dimension: grouping, masks, packing and checks.

Layout (NVIDIA's 2:4 layout, also LBC's): a conv weight ``[O, I, kh, kw]`` is permuted to
``[O, kh, kw, I]`` and flattened, a linear weight ``[out, in]`` is flattened row-major; every M
consecutive elements form one group. A weight is N:M when every group has at most N non-zeros
(exactly N after LBC's t_f or a top-N mask). The input-channel count (``I`` per conv group) must be
divisible by M.

Packed form of an N:M weight: the N kept values of each group (in order) plus, per kept value, its
position inside the group in ``ceil(log2 M)`` bits, packed into a uint8 bit stream.
"""

from __future__ import annotations

import itertools
import math

import torch

from evcli.ops.nm_pattern import MAX_M, parse_nm  # noqa: F401 - re-exported: the one N:M parser


def reduction_dim(weight: torch.Tensor) -> int:
    """Size of the input-channel (reduction) dimension of a conv ([O, I, kh, kw]) or linear ([out, in]) weight."""
    return int(weight.shape[1])


def to_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View a weight as ``[G, M]`` groups of M consecutive input-channel elements (conv as [O, kh, kw, I]).

    Differentiable (a permute and reshape); raises ValueError when the input channels are not divisible by M.
    """
    if reduction_dim(weight) % m:
        raise ValueError(f"input channels {reduction_dim(weight)} not divisible by M={m}")
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)
    elif weight.dim() != 2:
        raise ValueError(f"N:M groups need a 2-D (linear) or 4-D (conv) weight, got shape {tuple(weight.shape)}")
    return weight.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_groups` for a weight of ``shape``."""
    if len(shape) == 4:
        o, i, kh, kw = shape
        return groups.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return groups.reshape(shape)


def combination_table(n: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed table Π of LBC: ``[C(M,N), M]`` 0/1 rows, one per N-subset of the M positions (lexicographic)."""
    rows = list(itertools.combinations(range(m), n))
    table = torch.zeros(len(rows), m, device=device)
    for r, subset in enumerate(rows):
        table[r, list(subset)] = 1.0
    return table


def nm_mask(weight: torch.Tensor, n: int, m: int, score: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask keeping the N largest-|score| elements of every group (score defaults to the weight).

    SR-STE calls this every forward, so it uses topk (about twice as fast as a stable sort on CPU); exact ties
    between magnitudes are then broken by the kernel, deterministically for a given device.
    """
    s = (weight if score is None else score).detach().abs()
    groups = to_groups(s, m)
    order = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups)
    mask.scatter_(1, order, 1.0)
    return from_groups(mask, weight.shape).to(weight.dtype)


def group_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Number of non-zeros in each group, ``[G]``."""
    return (to_groups(weight.detach(), m) != 0).sum(dim=1)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group holds at most N non-zeros."""
    return bool((group_nonzeros(weight, m) <= n).all())


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups holding more than N non-zeros."""
    return int((group_nonzeros(weight, m) > n).sum())


def index_bits(m: int) -> int:
    """Bits needed for a position inside a group of M."""
    return max(1, math.ceil(math.log2(m)))


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small non-negative integers (< 2**bits) into a uint8 bit stream, little-endian within a byte."""
    flat = values.reshape(-1).to(torch.int64)
    bit_planes = ((flat.unsqueeze(1) >> torch.arange(bits)) & 1).reshape(-1)
    pad = (-bit_planes.numel()) % 8
    if pad:
        bit_planes = torch.cat([bit_planes, bit_planes.new_zeros(pad)])
    weights = 1 << torch.arange(8)
    return (bit_planes.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    planes = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (planes.reshape(count, bits) << torch.arange(bits)).sum(dim=1)


def pack_nm(weight: torch.Tensor, n: int, m: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Packed form of an N:M weight: ``values`` [G, N] in ``dtype`` and ``indices`` (bit-packed positions).

    Groups with fewer than N non-zeros keep zeros at their lowest free positions, so every group stores
    exactly N entries. Raises ValueError if a group holds more than N non-zeros.
    """
    groups = to_groups(weight.detach(), m)
    nz = groups != 0
    if int(nz.sum(dim=1).max()) > n:
        raise ValueError(f"weight is not {n}:{m}: {nm_violations(weight, n, m)} groups hold more than {n} non-zeros")
    # non-zeros first, then zeros, each in position order: the first N are the kept slots
    key = (~nz).to(torch.int64) * m + torch.arange(m)
    positions = torch.sort(key, dim=1).indices[:, :n]
    positions = torch.sort(positions, dim=1).values
    values = torch.gather(groups, 1, positions).to(dtype)
    return {
        "values": values.contiguous(),
        "indices": _pack_bits(positions, index_bits(m)),
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "nm": torch.tensor([n, m], dtype=torch.int64),
    }


def unpack_nm(packed: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight from :func:`pack_nm`'s output."""
    n, m = (int(v) for v in packed["nm"])
    shape = tuple(int(v) for v in packed["shape"])
    values = packed["values"].to(dtype)
    g = values.shape[0]
    positions = _unpack_bits(packed["indices"], index_bits(m), g * n).reshape(g, n)
    groups = torch.zeros(g, m, dtype=dtype)
    groups.scatter_(1, positions, values)
    return from_groups(groups, shape).contiguous()


def packed_nbytes(packed: dict[str, torch.Tensor]) -> int:
    """Bytes of the payload of a packed weight (values + indices; the few shape integers excluded)."""
    return packed["values"].numel() * packed["values"].element_size() + packed["indices"].numel()


def expected_packed_ratio(n: int, m: int, value_bits: int = 16) -> float:
    """Packed size / dense size for an N:M weight at ``value_bits`` per value: N(v + ceil(log2 M)) / (M v)."""
    return n * (value_bits + index_bits(m)) / (m * value_bits)


PACKED_PARTS = ("values", "indices", "shape", "nm")


def unpack_state(tensors: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """The dense fp32 state dict of a packed N:M file (``kind: packed_nm``): every packed layer unpacked, every
    other floating tensor back to fp32 (the packed file stores them in fp16)."""
    state: dict[str, torch.Tensor] = {}
    for key in layers:
        state[key] = unpack_nm({part: tensors[f"{key}.{part}"] for part in PACKED_PARTS}, torch.float32)
    parts = {f"{key}.{part}" for key in layers for part in PACKED_PARTS}
    for key, t in tensors.items():
        if key not in parts:
            state[key] = t.float() if t.is_floating_point() else t
    return state
