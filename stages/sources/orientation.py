"""Display orientation of recorded video: the whole display matrix (rotation and mirror).

A file may store its frames sideways or mirrored and say how to show them in a display matrix
(MP4/MOV `tkhd`, Matroska projection; FFmpeg hands it to each frame as side data). The
rotation angle alone cannot tell a mirror from a rotation (a left-right mirror reads as
180 degrees), so the matrix's 2x2 part is turned into array operations instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np


@dataclass(frozen=True)
class Orientation:
    """The display matrix's 2x2 part as array operations, in this order: `transpose` (swap the
    axes), then `flip_x` (left<->right), then `flip_y` (top<->bottom)."""

    transpose: bool = False
    flip_x: bool = False
    flip_y: bool = False

    @property
    def mirrored(self) -> bool:  # a negative determinant: no rotation can produce it
        return (self.transpose + self.flip_x + self.flip_y) % 2 == 1

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, C] as stored -> as displayed ([W, H, C] when `transpose`)."""
        if self == UPRIGHT:
            return pixels
        out = pixels.transpose(1, 0, 2) if self.transpose else pixels
        if self.flip_x:
            out = out[:, ::-1]
        if self.flip_y:
            out = out[::-1]
        return np.ascontiguousarray(out)


UPRIGHT = Orientation()


def orientation_from_matrix(matrix: np.ndarray | list[int]) -> Orientation:
    """The orientation a display matrix asks for (FFmpeg `AV_FRAME_DATA_DISPLAYMATRIX`: 9 int32,
    row-major [a b u; c d v; x y w], 16.16 fixed point). A source point (x, y), y pointing
    down, is displayed at (a*x + c*y, b*x + d*y) (libavutil/display.h). Only the eight axis-
    aligned cases exist in practice; an odd angle is rounded to the nearest of them. This
    agrees with FFmpeg's command-line autorotation (fftools: transpose / hflip / vflip)."""
    a, b, _, c, d = (float(v) for v in list(matrix)[:5])
    if abs(a) + abs(d) >= abs(b) + abs(c):  # x stays x: flips only
        return Orientation(False, a < 0, d < 0)
    return Orientation(True, c < 0, b < 0)  # x' = c*y, y' = b*x: swap the axes, then flip


def frame_orientation(frame: av.VideoFrame) -> Orientation:
    """From the frame's display-matrix side data; the rotation angle alone when there is none
    (or when this PyAV cannot hand the side data out)."""
    try:
        for sd in frame.side_data:
            if sd.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
                m = np.frombuffer(bytes(sd), dtype=np.int32)
                if m.size >= 9:
                    return orientation_from_matrix(m)
    except (AttributeError, TypeError, ValueError):
        pass
    k = int(round((getattr(frame, "rotation", 0) or 0) / 90)) % 4  # counter-clockwise quarter turns
    return [UPRIGHT, Orientation(True, False, True), Orientation(False, True, True),
            Orientation(True, True, False)][k]
