"""ICC profiles for tests, written byte by byte (Pillow's ImageCms builds sRGB, LAB and XYZ only; the machine has no
profile files): a matrix/TRC RGB display profile (Display P3's primaries) and a CMYK printer profile whose lookup
table sends every ink mix to one Lab colour. ICC.1:2001 (v2) layouts: header, tag table, tag data."""

from __future__ import annotations

import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)  # the profile connection space's white
# Display P3's primaries adapted to D50 (the colorants of Apple's "Display P3" profile), columns r, g, b
P3_COLORANTS = ((0.5151, 0.2412, -0.0011), (0.2919, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
# sRGB's, adapted to D50 the same way (IEC 61966-2.1 as ICC profiles store it)
SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))
P3_GAMMA = 2.2  # a pure power curve (Display P3 uses sRGB's piecewise one; close enough for a test profile)


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(values) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in values)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(4 + 4 + 2 + 1 + 67)


def _text(text: str) -> bytes:
    return b"text" + bytes(4) + text.encode("ascii") + b"\0"


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    table_len = 4 + 12 * len(tags)
    offset, entries, data = 128 + table_len, b"", b""
    for sig, body in tags.items():
        body += bytes(-len(body) % 4)
        entries += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = 128 + table_len + len(data)
    header = (struct.pack(">I", size) + bytes(4) + bytes((2, 0x10, 0, 0)) + device_class + space + pcs + bytes(12)
              + b"acsp" + bytes(4 * 4 + 8) + struct.pack(">I", 0) + b"".join(_s15(v) for v in D50) + bytes(4 + 16 + 28))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + entries + data


def display_p3_profile() -> bytes:
    """An RGB display profile with Display P3's primaries, D65 white (stored as D50, as ICC does) and gamma 2.2."""
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(P3_GAMMA * 256)) + bytes(2)
    red, green, blue = P3_COLORANTS
    return _profile(b"mntr", b"RGB ", b"XYZ ", {
        b"desc": _desc("Display P3 (test)"), b"wtpt": _xyz(D50), b"cprt": _text("test"),
        b"rXYZ": _xyz(red), b"gXYZ": _xyz(green), b"bXYZ": _xyz(blue), b"rTRC": curve, b"gTRC": curve, b"bTRC": curve})


def flat_cmyk_profile(lab_bytes: tuple[int, int, int] = (128, 128, 128)) -> bytes:
    """A CMYK printer profile whose A2B0 table (lut8, 2 grid points per ink) maps every ink mix to the one Lab colour
    `lab_bytes` (lut8's Lab encoding: L* = L/255*100, a* = a-128, b* = b-128): a converted picture is that colour
    everywhere, which Pillow's profile-blind CMYK -> RGB never gives."""
    identity = np.eye(3)
    ramp = bytes(range(256))
    lut = (b"mft1" + bytes(4) + bytes((4, 3, 2, 0)) + b"".join(_s15(v) for v in identity.reshape(-1))
           + ramp * 4 + bytes(lab_bytes) * 2 ** 4 + ramp * 3)
    return _profile(b"prtr", b"CMYK", b"Lab ", {
        b"desc": _desc("flat CMYK (test)"), b"wtpt": _xyz(D50), b"cprt": _text("test"), b"A2B0": lut})


def grey_profile(gamma: float) -> bytes:
    """A grey display profile (colour space GRAY) whose tone curve is a pure power `gamma` (1.0: a scanner's linear
    grey), D50 white."""
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    return _profile(b"mntr", b"GRAY", b"XYZ ", {
        b"desc": _desc(f"grey gamma {gamma} (test)"), b"wtpt": _xyz(D50), b"cprt": _text("test"), b"kTRC": curve})


def grey_to_srgb(levels: np.ndarray, gamma: float) -> np.ndarray:
    """What a colour-managed viewer shows for grey `levels` (uint8) under grey_profile(gamma), as sRGB levels."""
    return _srgb_encoded((levels.astype(np.float64) / 255) ** gamma)


def _srgb_encoded(linear: np.ndarray) -> np.ndarray:
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255).astype(np.uint8)


def p3_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """What a colour-managed viewer shows for `rgb` (uint8, Display P3 as display_p3_profile says) in sRGB, worked out
    here with the matrices (not through LittleCMS): P3 levels -> linear -> XYZ (D50) -> linear sRGB -> sRGB levels."""
    linear = (rgb.astype(np.float64) / 255) ** P3_GAMMA
    xyz = linear @ np.asarray(P3_COLORANTS)
    return _srgb_encoded(np.clip(xyz @ np.linalg.inv(np.asarray(SRGB_COLORANTS)), 0, 1))
