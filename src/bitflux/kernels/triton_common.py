"""Triton device helpers shared by the ternary kernels: tile order and the `2bit` decode."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`: GROUP_M consecutive M-tiles walk N together (weights stay in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    return pid_m, pid_n


@triton.jit
def decode_2bit(packed, shift):
    """Packed bytes shifted to their field -> int8 codes: 00 = 0, 01 = +1, 10 = -1 (packing.pack_2bit_u8)."""
    f = (packed >> shift) & 3
    return (f & 1).to(tl.int8) - (f >> 1).to(tl.int8)
