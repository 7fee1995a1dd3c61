"""Fast path for reading the judge's images: a plain 8-bit RGB PNG (what `render.save_png`,
`io.png_bytes` and most editors write) decoded without PIL's file and plugin machinery,
which costs more than the decoding itself on a 64x64 image.

The chunks are walked here (CRCs checked) and the image data goes to PIL's own PNG data
decoder ("zip": inflate and undo the row filters), so the pixels are those of
`render.load_png`. Anything else (another colour type or depth, interlacing, a palette, an
unknown critical chunk, a broken or missing file) returns None, and the caller reads the
file the ordinary way, which also reports errors as before.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RGB8 = (8, 2, 0, 0, 0)        # IHDR: bit depth, colour type (RGB), compression, filter, interlace


def read_png(path: str | os.PathLike) -> np.ndarray | None:
    """[H, W, 3] uint8 (writable) of a non-interlaced 8-bit RGB PNG at `path`, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data.startswith(_SIGNATURE):
        return None
    view = memoryview(data)
    pos, size, idat, idat_done = len(_SIGNATURE), None, [], False
    while True:                                  # chunks: length, type, body, CRC of type + body
        if pos + 12 > len(data):
            return None                          # no IEND: truncated
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(view[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return None
        if size is None:                         # IHDR comes first
            if kind != b"IHDR" or length != 13:
                return None
            w, h, *fmt = struct.unpack_from(">IIBBBBB", data, pos + 8)
            if tuple(fmt) != _RGB8 or not (w and h):
                return None
            size = (w, h)
        elif kind == b"IDAT":
            if idat_done:
                return None                      # image data must be consecutive
            idat.append(view[pos + 8:end])
        elif kind == b"IEND":
            break
        elif not kind[0] & 0x20:
            return None                          # another critical chunk (PLTE, ...)
        else:
            idat_done = bool(idat)               # an ancillary chunk: skipped
        pos = end + 4
    if not idat:
        return None
    try:
        pixels = _decode(b"".join(idat), size)
    except (ValueError, OSError, zlib.error):
        return None
    return np.frombuffer(bytearray(pixels), np.uint8).reshape(size[1], size[0], 3)


def _decode(data: bytes, size: tuple[int, int]) -> bytes:
    """RGB bytes of PNG image data (the IDAT chunks' contents): what Image.frombytes(...,
    "zip", "RGB").tobytes() gives, by driving PIL's decoder and raw encoder directly (their
    Python wrappers cost more than the work on a small image); through those wrappers if
    PIL's core interface is not the expected one."""
    try:
        im = Image.core.new("RGB", size)
        decoder = Image.core.zip_decoder("RGB", "RGB")
        encoder = Image.core.raw_encoder("RGB", "RGB")
    except (AttributeError, TypeError):
        return Image.frombytes("RGB", size, data, "zip", "RGB").tobytes()
    decoder.setimage(im, (0, 0, *size))
    consumed, err = decoder.decode(data)
    if consumed >= 0 or err != 0:              # as Image.frombytes: not enough data, or corrupt
        raise ValueError("cannot decode image data")
    encoder.setimage(im, (0, 0, *size))
    out = []
    while True:
        _, err, chunk = encoder.encode(max(65536, 4 * size[0]))
        out.append(chunk)
        if err:
            break
    if err < 0:
        raise ValueError(f"encoder error {err}")
    return b"".join(out)
