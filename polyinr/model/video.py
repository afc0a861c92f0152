"""Frames to a video file: an animated GIF (Pillow) or an MP4 (OpenCV, when installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """uint8 (F, H, W, 3) frames -> an animated GIF (Pillow) or an MP4 (OpenCV's MPEG-4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        first, *rest = (Image.fromarray(f) for f in frames)
        first.save(path, save_all=True, append_images=rest, duration=1000 / fps, loop=0)
        return
    try:
        import cv2
    except ImportError:
        raise ValueError("MP4 needs OpenCV (pip install opencv-python); write a .gif") from None
    h, w = frames.shape[1:3]
    video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not video.isOpened():
        raise ValueError(f"OpenCV cannot write {path} (no MPEG-4 encoder); write a .gif")
    for frame in frames:
        video.write(frame[:, :, ::-1].copy())  # OpenCV wants BGR
    video.release()
