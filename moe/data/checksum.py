"""CRC-32 of a concatenation from the CRC-32s of its parts, without reading them again (zlib's crc32_combine,
which Python's zlib module does not expose).

A source's token stream is its shards' arrays one after the other; its checksum in the resume fingerprint is the
CRC-32 of that whole stream, as it was when a source was one array, so checkpoints written then still compare
equal. Appending n zero bytes to a message is a linear map on its CRC register over GF(2); the map for n bytes is
built from the one for a single zero bit by repeated squaring, so combining costs O(log n) 32x32 matrix products.
"""

from __future__ import annotations

_POLYNOMIAL = 0xEDB88320  # CRC-32's generator polynomial, bit-reflected as zlib uses it


def _times(matrix: list[int], vector: int) -> int:
    result, row = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[row]
        vector >>= 1
        row += 1
    return result


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, matrix[row]) for row in range(32)]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B, given crc1 = crc32(A), crc2 = crc32(B) and length2 = len(B) in bytes."""
    if length2 <= 0:
        return crc1
    odd = [_POLYNOMIAL] + [1 << row for row in range(31)]  # the register after one zero bit
    even = _square(odd)  # two zero bits
    odd = _square(even)  # four zero bits
    while True:
        even = _square(odd)  # 8, 32, 128, ... zero bits: one byte, then 4, 16, ...
        if length2 & 1:
            crc1 = _times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = _square(even)
        if length2 & 1:
            crc1 = _times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2


def combined_crc32(parts: list[tuple[int, int]]) -> int:
    """CRC-32 of the concatenation of parts given as (crc32, length in bytes)."""
    crc = 0
    for part_crc, length in parts:
        crc = crc32_combine(crc, part_crc, length)
    return crc
