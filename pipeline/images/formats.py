"""What a file's bytes say before any pixel is decoded: JPEG and PNG structure, BMP headers.

    jpeg_header                   a JPEG's size, components, EXIF and whether its scans
                                  reach its end-of-image marker
    exif_orientation              the orientation in an EXIF block, as Pillow reads it
    tf_reads_bmp                  whether TF's BMP decoder takes a file (Keras stops on others)
    png_without_inflated_chunks   a PNG without its text and ICC chunks (Pillow's caps)
    png_orientation               a PNG's EXIF orientation without inflating its pixels

Each walks headers and segment lengths only: microseconds per file, so the decoders' checks
cost nothing next to a decode.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

__all__ = [
    "PNG_SIGNATURE",
    "JpegHeader",
    "exif_orientation",
    "jpeg_header",
    "png_orientation",
    "png_without_inflated_chunks",
    "tf_reads_bmp",
]


# A marker inside entropy-coded data: 0xFF followed by neither 0x00 (a stuffed byte), a
# restart marker (0xD0-0xD7) nor 0xFF (a fill byte).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class JpegHeader(NamedTuple):
    """What a JPEG's markers say: its frame size and components (0 when no frame header
    comes before the first scan), its first EXIF segment (where Pillow reads the
    orientation) and whether its scans reach the end-of-image marker."""

    width: int
    height: int
    components: int
    exif: bytes | None
    complete: bool


# Start-of-frame markers: every JPEG coding process (0xC4, 0xC8 and 0xCC are not frames).
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> JpegHeader:
    """Walk a JPEG's segments: frame header, EXIF and completeness in one pass.

    Completeness: on a truncated JPEG TF's decoder fails only after libjpeg has printed
    "Input file read error" on stderr (twice: graph, then eager). This walk (segment
    lengths, then a search for the marker after each scan) finds the cut first; over
    every cut point of baseline, progressive and thumbnail-carrying files it agrees with
    TF's accept/refuse exactly. Bytes after the end marker (camera trailers) are allowed;
    a damaged (not short) file counts as complete: the decoder judges it.

    Why not Pillow: its header parse (Python per marker) cost more than sha256 and this
    walk together, next to a 0.3-0.7 ms decode.
    """
    end, at = len(data), 2
    width = height = components = 0
    exif: bytes | None = None
    scanned = False

    def header(complete: bool) -> JpegHeader:
        return JpegHeader(width, height, components, exif, complete)

    while True:
        while data[at : at + 2] == b"\xff\xff":  # fill bytes before a marker
            at += 1
        if at + 2 > end:
            return header(False)
        if data[at] != 0xFF:
            return header(True)  # damaged, not short: the decoder judges
        code = data[at + 1]
        if code == 0xD9:  # end of image
            return header(True)
        if 0xD0 <= code <= 0xD7 or code == 0x01:  # markers without a length
            at += 2
            continue
        if at + 4 > end:
            return header(False)
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if not scanned:  # Pillow reads the header up to the first scan
            body = data[at + 4 : at + 2 + length]
            if code in _JPEG_FRAMES and not components and len(body) >= 6:
                height, width = struct.unpack_from(">HH", body, 1)
                components = body[5]
            elif code == 0xE1 and exif is None and body.startswith(b"Exif\x00\x00"):
                exif = body
        at += 2 + length
        if code == 0xDA:  # start of scan: entropy-coded data up to the next marker
            if data.endswith(b"\xff\xd9"):
                # Ends with its end marker, which entropy-coded data cannot hold (a 0xFF
                # there is followed by 0x00 or a restart marker): complete, and the header
                # is read. Saves searching the scans (in C, but holding the GIL).
                return header(True)
            scanned = True
            marker = _JPEG_MARKER.search(data, at)
            if marker is None:
                return header(False)
            at = marker.start()
        elif at > end:
            return header(False)


def exif_orientation(exif: bytes | None) -> int:
    """The orientation tag (0x0112) of an EXIF block as Pillow's ``getexif()`` reads it;
    1 when there is none or the block is unreadable."""
    if not exif:
        return 1
    from PIL import Image

    try:
        parsed = Image.Exif()
        parsed.load(exif)
        return int(parsed.get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block orients nothing
        return 1


def tf_reads_bmp(data: bytes) -> bool:
    """Whether TF's BMP decoder takes this file: an info header (40 bytes or more), 8, 24
    or 32 bits per pixel, not run-length encoded.

    TF refuses the others (1-, 4- and 16-bit ones: "Number of channels inherent in the
    image must be 1, 3 or 4") or would read their bytes as raw pixels, so Keras stops on
    them; Pillow decodes them (a documented deviation).
    """
    if len(data) < 34:
        return False
    header, bits, compression = struct.unpack_from("<I10xHI", data, 14)
    return header >= 40 and bits in (8, 24, 32) and compression in (0, 3)  # BI_RGB, BITFIELDS


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# The PNG chunks Pillow inflates while reading a header: text and the ICC profile. None
# of them changes a pixel (neither Pillow nor TF applies the profile).
_PNG_INFLATED = {b"tEXt", b"zTXt", b"iTXt", b"iCCP"}


def png_without_inflated_chunks(data: bytes) -> bytes:
    """A PNG's bytes without its text and ICC-profile chunks (nothing is inflated).

    A malformed chunk list is kept from the first bad length on, for Pillow to judge.
    """
    kept, at = [data[:8]], 8
    while at + 12 <= len(data):
        kind = data[at + 4 : at + 8]
        end = at + 12 + int.from_bytes(data[at : at + 4], "big")
        if end > len(data):
            break
        if kind not in _PNG_INFLATED:
            kept.append(data[at:end])
        at = end
        if kind == b"IEND":
            break
    kept.append(data[at:])
    return b"".join(kept)


def png_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) Pillow's ``getexif()`` finds in a PNG; 1 when none.

    Where Pillow looks: the eXIf chunk, else ImageMagick's "Raw profile type exif" text
    chunk (hex digits after three header lines), before or after the pixel data.

    Why: Pillow's ``getexif()`` on a PNG without an eXIf chunk before its pixels inflates
    every pixel looking for one later (~2.6 ms for a photo, more than TF's whole decode).
    Walking the chunk headers costs microseconds; a malformed chunk list stops the walk
    (the decoder judges the file), an unreadable EXIF block orients nothing.
    """
    from PIL import PngImagePlugin

    exif, raw_profile = None, None
    at = 8
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if kind == b"eXIf" and exif is None:
            exif = b"Exif\x00\x00" + body
        elif kind in (b"tEXt", b"zTXt") and raw_profile is None:
            keyword, _, text = body.partition(b"\x00")
            if keyword == b"Raw profile type exif":
                raw_profile = text if kind == b"tEXt" else _inflate(
                    text[1:], PngImagePlugin.MAX_TEXT_CHUNK)
        elif kind == b"IEND":
            break
        at += 12 + length
    if exif is None and raw_profile is not None:
        try:
            exif = bytes.fromhex("".join(raw_profile.decode("latin-1").split("\n")[3:]))
        except ValueError:  # not hex: an unreadable EXIF block orients nothing
            return 1
    return exif_orientation(exif)


def _inflate(data: bytes, limit: int) -> bytes | None:
    """zlib data inflated up to ``limit`` bytes (Pillow's cap on text chunks); None if
    it is damaged or larger."""
    import zlib

    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        return None
    return out if len(out) <= limit else None
