"""Triton kernels for the multiresolution hash encoding (hashgrid.HashEncoding's `triton` backend).

One launch per level and direction: a program takes BLOCK points of one level, finds their cell, and
gathers (forward) or scatters with atomic adds (backward) the 8 corners' feature rows. The level's
resolution, table mask and column are runtime scalars and `DENSE` a constexpr, so every level shares
two compiled variants. The tables stay separate parameters (the checkpoint layout of `encoding.tables.<i>`),
which costs one launch per level instead of one in all; the work per launch is the same.

Only the tables get gradients: the points come from ray samples, which do not require grad.
Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

POINTS_PER_PROGRAM = 128
# the hash keeps the low 32 bits of each product (uint32 wrap-around), which equals the int64 product
# modulo the table size only while that size divides 2^32
MAX_HASHED_TABLE_SIZE = 2**32


@triton.jit
def _cell(points_ptr, rows, valid, resolution):
    """Integer low corner and fractional position of each point in the level's grid, as the torch path."""
    x = tl.load(points_ptr + rows * 3, mask=valid, other=0.0)
    y = tl.load(points_ptr + rows * 3 + 1, mask=valid, other=0.0)
    z = tl.load(points_ptr + rows * 3 + 2, mask=valid, other=0.0)
    pos_x = tl.minimum(tl.maximum(x, 0.0), 1.0) * resolution
    pos_y = tl.minimum(tl.maximum(y, 0.0), 1.0) * resolution
    pos_z = tl.minimum(tl.maximum(z, 0.0), 1.0) * resolution
    # x = 1 lies in the last cell at weight 1; the lower bound keeps a NaN point's rows inside the table
    low_x = tl.minimum(tl.maximum(tl.floor(pos_x), 0.0), resolution - 1.0)
    low_y = tl.minimum(tl.maximum(tl.floor(pos_y), 0.0), resolution - 1.0)
    low_z = tl.minimum(tl.maximum(tl.floor(pos_z), 0.0), resolution - 1.0)
    return (low_x.to(tl.int64), low_y.to(tl.int64), low_z.to(tl.int64),
            pos_x - low_x, pos_y - low_y, pos_z - low_z)


@triton.jit
def _axis(low, frac, UPPER: tl.constexpr):
    """A corner's coordinate and weight along one axis: the cell's upper or lower side."""
    if UPPER:
        return low + 1, frac
    else:
        return low, 1.0 - frac


@triton.jit
def _corner(low_x, low_y, low_z, frac_x, frac_y, frac_z, resolution, index_mask, CORNER: tl.constexpr,
            DENSE: tl.constexpr, PRIME_X: tl.constexpr, PRIME_Y: tl.constexpr, PRIME_Z: tl.constexpr):
    """Table row and trilinear weight of corner CORNER (bits x, y, z = 4, 2, 1, the torch path's order)."""
    cx, wx = _axis(low_x, frac_x, (CORNER >> 2) & 1)
    cy, wy = _axis(low_y, frac_y, (CORNER >> 1) & 1)
    cz, wz = _axis(low_z, frac_z, CORNER & 1)
    if DENSE:
        side = resolution + 1
        index = cx + side * (cy + side * cz)
    else:
        # uint32 products keep exactly the low 32 bits of the int64 products the torch path XORs
        hashed = ((cx.to(tl.uint32) * PRIME_X) ^ (cy.to(tl.uint32) * PRIME_Y) ^ (cz.to(tl.uint32) * PRIME_Z))
        # tl.cast, not .to: torch.compile's mutation analysis traces the kernel with this scalar as a Python int
        index = (hashed & tl.cast(index_mask, tl.uint32)).to(tl.int64)
    return index, (wx * wy) * wz


# resolution and index mask stay runtime values even when 1, so each kernel compiles once per DENSE
@triton.jit(do_not_specialize=["resolution", "index_mask"])
def _forward_kernel(points_ptr, table_ptr, out_ptr, n_points, resolution, index_mask, out_row_stride, out_column,
                    FEATURES: tl.constexpr, FEATURES_POW2: tl.constexpr, DENSE: tl.constexpr,
                    PRIME_X: tl.constexpr, PRIME_Y: tl.constexpr, PRIME_Z: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n_points
    feature = tl.arange(0, FEATURES_POW2)
    valid_2d = valid[:, None] & (feature < FEATURES)[None, :]
    low_x, low_y, low_z, frac_x, frac_y, frac_z = _cell(points_ptr, rows, valid, resolution)
    acc = tl.zeros((BLOCK, FEATURES_POW2), dtype=tl.float32)
    for corner in tl.static_range(8):
        index, weight = _corner(low_x, low_y, low_z, frac_x, frac_y, frac_z, resolution, index_mask, corner,
                                DENSE, PRIME_X, PRIME_Y, PRIME_Z)
        values = tl.load(table_ptr + index[:, None] * FEATURES + feature[None, :], mask=valid_2d, other=0.0)
        acc += weight[:, None] * values.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * out_row_stride + out_column + feature[None, :], acc, mask=valid_2d)


@triton.jit(do_not_specialize=["resolution", "index_mask"])
def _backward_kernel(points_ptr, grad_out_ptr, grad_table_ptr, n_points, resolution, index_mask, grad_row_stride,
                     grad_column, FEATURES: tl.constexpr, FEATURES_POW2: tl.constexpr, DENSE: tl.constexpr,
                     PRIME_X: tl.constexpr, PRIME_Y: tl.constexpr, PRIME_Z: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n_points
    feature = tl.arange(0, FEATURES_POW2)
    valid_2d = valid[:, None] & (feature < FEATURES)[None, :]
    low_x, low_y, low_z, frac_x, frac_y, frac_z = _cell(points_ptr, rows, valid, resolution)
    grad = tl.load(grad_out_ptr + rows[:, None] * grad_row_stride + grad_column + feature[None, :],
                   mask=valid_2d, other=0.0).to(tl.float32)
    for corner in tl.static_range(8):
        index, weight = _corner(low_x, low_y, low_z, frac_x, frac_y, frac_z, resolution, index_mask, corner,
                                DENSE, PRIME_X, PRIME_Y, PRIME_Z)
        # relaxed: the adds only need to be atomic, not ordered, and relaxed ones are the cheapest
        tl.atomic_add(grad_table_ptr + index[:, None] * FEATURES + feature[None, :], weight[:, None] * grad,
                      mask=valid_2d, sem="relaxed")


INTERPRETED = not isinstance(_forward_kernel, JITFunction)


def points_need_grad(unit: Tensor) -> bool:
    """Whether autograd would ask for a gradient w.r.t. these points, which the kernels do not give."""
    return unit.requires_grad and torch.is_grad_enabled()


def check_launchable(unit: Tensor) -> None:
    """Raise a clear error when the kernels cannot take these points."""
    if not (unit.is_cuda or INTERPRETED):
        raise ValueError(f"the triton hash encoding needs points on a CUDA device, got {unit.device} "
                         "(set TRITON_INTERPRET=1 before import to run it on CPU, or use backend='torch')")
    if points_need_grad(unit):
        raise ValueError("the triton hash encoding gives no gradient w.r.t. the points, and these require grad: "
                         "detach them or use backend='torch'")


def _launches(unit: Tensor, levels: tuple, features: int, primes: tuple[int, int, int]) -> list[tuple]:
    """Per level: its number, grid, resolution, index mask and constexprs; none when there are no points."""
    if unit.shape[0] == 0:  # an empty grid is no launch
        return []
    grid = (triton.cdiv(unit.shape[0], POINTS_PER_PROGRAM),)
    launches = []
    for number, (resolution, dense, table_size) in enumerate(levels):
        constants = {"FEATURES": features, "FEATURES_POW2": triton.next_power_of_2(features), "DENSE": dense,
                     "PRIME_X": primes[0], "PRIME_Y": primes[1], "PRIME_Z": primes[2], "BLOCK": POINTS_PER_PROGRAM}
        launches.append((number, grid, resolution, table_size - 1, constants))
    return launches


def _on_device_of(tensor: Tensor):
    """The tensor's CUDA device as the current one while kernels launch (a no-op for CPU tensors: the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class _HashEncodingFunction(torch.autograd.Function):
    """Features (N, levels * F) in float32 of points (N, 3); gradients for the tables only."""

    @staticmethod
    def forward(ctx, unit: Tensor, levels: tuple, primes: tuple, *tables: Tensor) -> Tensor:
        features = tables[0].shape[1]
        out = unit.new_empty(unit.shape[0], len(tables) * features, dtype=torch.float32)
        with _on_device_of(unit):  # triton launches on the current CUDA device, not the tensors'
            for number, grid, resolution, index_mask, constants in _launches(unit, levels, features, primes):
                _forward_kernel[grid](unit, tables[number], out, unit.shape[0], resolution, index_mask, out.stride(0),
                                      number * features, **constants)
        ctx.levels, ctx.primes = levels, primes
        ctx.save_for_backward(unit, *tables)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        unit, *tables = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        features = tables[0].shape[1]
        check_deterministic()
        grads = [torch.zeros(table.shape, dtype=torch.float32, device=table.device) for table in tables]
        with _on_device_of(unit):
            for number, grid, resolution, index_mask, constants in _launches(unit, ctx.levels, features, ctx.primes):
                _backward_kernel[grid](unit, grad_out, grads[number], unit.shape[0], resolution, index_mask,
                                       grad_out.stride(0), number * features, **constants)
        return None, None, None, *(grad.to(table.dtype) for grad, table in zip(grads, tables, strict=True))


def check_deterministic() -> None:
    """Under torch.use_deterministic_algorithms the backward's unordered atomic adds are an error (a warning in
    warn-only mode), as torch's own nondeterministic kernels are. Public API only: torch's internal alert is not
    in every release the suite supports."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = ("the triton hash encoding's backward adds with unordered atomics, and deterministic algorithms are on "
               "(deterministic=true): use model.net.backend=torch (or auto, which picks it then)")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def hash_encode(unit: Tensor, tables: tuple[Tensor, ...], resolutions: list[int], dense: list[bool],
                primes: tuple[int, int, int]) -> Tensor:
    """The encoding of points (N, 3) in [0, 1]^3 with the Triton kernels: (N, len(tables) * F) float32.

    Same values as hashgrid.HashEncoding's torch path (row order, hash and trilinear weights), up to the
    order of float additions. Tables are (rows, F) contiguous; rows = (res + 1)^3 if dense, else 2^k."""
    check_launchable(unit)
    levels = []
    for table, resolution, is_dense in zip(tables, resolutions, dense, strict=True):
        if not (is_dense or table.shape[0] <= MAX_HASHED_TABLE_SIZE):
            raise ValueError(f"the triton hash encoding hashes into at most 2^32 rows, got {table.shape[0]}")
        levels.append((resolution, is_dense, table.shape[0]))
    unit = unit.float().contiguous()
    return _HashEncodingFunction.apply(unit, tuple(levels), tuple(primes), *(t.contiguous() for t in tables))
