"""Videos: a video file, a folder of frames or a list of images -> sampled RGB frames and their rate.

`open_video` plans before anything is decoded: it reads a video file's stream metadata (frame count,
frame rate, width, height) or a folder's image headers, chooses the frames to take, and refuses what
could not be decoded safely (a FIFO, device or socket; a corrupt file; frames of different sizes; a
decode larger than the memory budget). `Video.decode` then decodes only the chosen frames.
`load_video` does both.

Frame sampling is qwen-vl-utils' (and mlx-vlm's): a video file of ``total`` frames at ``rate`` frames
per second is sampled at ``fps`` (default 2.0): ``n = total / rate * fps`` frames, clamped to
[`MIN_FRAMES`, min(``max_frames``, total)] and rounded down to a multiple of the temporal patch size
(2), taken evenly spaced (``linspace(0, total - 1, n)`` rounded); the frames then stand for
``n / total * rate`` frames per second, the rate the processor's temporal positions (Qwen2.5-VL) and
timestamps (Qwen3-VL) are computed from. A folder of frames or a list of images is used as given,
taken at ``fps`` (default 2.0) frames per second; when it holds more than ``max_frames`` (default
`MAX_FRAMES`, 768) it is evenly subsampled to that many, and the rate drops in proportion. A video
shorter than the temporal patch size repeats its last frame (as qwen-vl-utils does for frame lists).

Video files are decoded by PyAV (FFmpeg; ``pip install 'mlx-compact[video]'``), imported only when a
video file is given; a folder of frames needs nothing extra (its files are read by
`mlx_compact.images`, header first). Frames are turned upright by the stream's display rotation, as
images are by their EXIF orientation. Every error is a one-line `InputError` naming the file.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .files import InputError, open_regular

DEFAULT_FPS = 2.0  # qwen-vl-utils' FPS and mlx-vlm's default --fps
MIN_FRAMES = 4  # qwen-vl-utils' FPS_MIN_FRAMES: a short clip still gets this many frames (when it has them)
MAX_FRAMES = 768  # qwen-vl-utils' FPS_MAX_FRAMES
FRAME_FACTOR = 2  # frames come in multiples of the temporal patch size of every Qwen-VL checkpoint
MAX_FRAME_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, per frame
MAX_ASPECT = 200  # as for images: transformers' smart_resize refuses more
MISSING_PYAV = "reading video files needs PyAV: pip install 'mlx-compact[video]' (or give a folder of frames)"


def _av():
    try:
        import av
    except ImportError:
        raise InputError(MISSING_PYAV) from None
    return av


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _natural_key(name: str):
    """frame2.png before frame10.png."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


def _check_options(fps, max_frames) -> tuple:
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0
    ):
        raise InputError(f"fps must be a number > 0 (frames per second), got {fps!r}")
    if max_frames is not None and (type(max_frames) is not int or max_frames < 1):
        raise InputError(f"max_frames must be a whole number >= 1, got {max_frames!r}")
    return float(fps) if fps is not None else None, max_frames


def sample_count(
    total: int, rate: float, fps: float = DEFAULT_FPS, max_frames: int = MAX_FRAMES, factor: int = FRAME_FACTOR
) -> int:
    """Frames to take from a video file of ``total`` frames at ``rate`` frames per second (see the module
    docstring): qwen-vl-utils' ``smart_nframes``; a video of fewer than ``factor`` frames gives all of them."""
    if total < factor:
        return total
    lo = math.ceil(MIN_FRAMES / factor) * factor
    hi = max(factor, math.floor(min(max_frames, total) / factor) * factor)
    n = min(max(total / rate * fps, lo), hi, total)
    return max(factor, math.floor(n / factor) * factor)


def even_indices(total: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of ``total`` items, first and last included (``linspace`` rounded)."""
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


@dataclass
class Video:
    """A video planned but not decoded: ``height`` x ``width`` frames (as the model will see them),
    ``indices`` of the frames to take among ``total`` (for a file, ``rate`` is its frame rate), and the
    rate ``fps`` the taken frames stand for. `decode` returns them as RGB PIL images."""

    source: str  # what the user gave, for messages
    kind: str  # "file", "folder" or "frames"
    height: int
    width: int
    total: int
    indices: list[int]
    fps: float
    rate: float | None = None  # a file's frame rate
    items: list = field(default_factory=list, repr=False)  # a folder's files or the frames given
    factor: int = FRAME_FACTOR
    rotation: int = 0  # display rotation of a file's frames, degrees counterclockwise
    decoded_bytes: int = 0  # after `decode`: the bytes the decoded frames took

    @property
    def num_frames(self) -> int:
        """Frames the model sees (a video shorter than the temporal patch size repeats its last frame; a stream
        that ends before its metadata said gives fewer)."""
        return max(len(self.indices), self.factor)

    def decode_bytes(self) -> int:
        """Peak bytes of decoding: the taken frames in RGB, and one frame's decoder buffers and conversions."""
        pixels = self.height * self.width
        return self.num_frames * pixels * 3 + (pixels * 8 if self.kind != "frames" else 0)

    def decode(self) -> list[Image.Image]:
        """The taken frames, RGB PIL images all of the planned size."""
        if self.kind == "file":
            frames = self._decode_file()
        else:
            from .processor import to_rgb

            try:
                frames = [to_rgb(self.items[i]) for i in self.indices]
            except InputError:
                raise
            except ValueError as e:
                raise InputError(f"video {self.source}: {_one_line(e)}") from None
        for i, f in zip(self.indices, frames):
            if (f.height, f.width) != (self.height, self.width):
                where = f"frame {i}" if self.kind != "folder" else f"frame {self.items[i]}"
                raise InputError(
                    f"video {self.source}: {where} is {f.width}x{f.height} pixels but the video's "
                    f"frames are {self.width}x{self.height}; every frame must have the same size"
                )
        if not frames:
            raise InputError(f"video {self.source}: no frame could be decoded; the file is corrupt or truncated")
        frames += [frames[-1]] * (self.factor - len(frames))  # shorter than the temporal patch: repeat the last
        self.decoded_bytes = sum(f.width * f.height * 3 for f in frames)
        return frames

    def _decode_file(self) -> list[Image.Image]:
        av = _av()
        wanted = sorted(set(self.indices))
        counts = {i: self.indices.count(i) for i in wanted}
        frames = []
        with open_regular(self.source, what="video") as f:
            try:
                with av.open(f, "r") as container:
                    stream = container.streams.video[0]
                    stream.thread_type = "AUTO"
                    k, last = 0, wanted[-1]
                    for i, frame in enumerate(container.decode(stream)):
                        if i > last:
                            break
                        if i != wanted[k]:
                            continue
                        if frame.width * frame.height > self.height * self.width:  # before converting it
                            raise InputError(
                                f"video {self.source}: frame {i} is {frame.width}x{frame.height} "
                                f"pixels but the stream says {self.width}x{self.height}; every frame "
                                "must have the same size"
                            )
                        image = _upright(frame.to_image(), getattr(frame, "rotation", 0) or 0)
                        frames += [image] * counts[i]
                        k += 1
            except (InputError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:
                raise InputError(f"cannot read video {self.source}: corrupt or truncated ({_one_line(e)})") from None
        return frames


def _upright(image: Image.Image, rotation: int) -> Image.Image:
    """Turn a frame by its display rotation (degrees counterclockwise, multiples of 90)."""
    turn = {
        90: Image.Transpose.ROTATE_90,
        180: Image.Transpose.ROTATE_180,
        -180: Image.Transpose.ROTATE_180,
        -90: Image.Transpose.ROTATE_270,
        270: Image.Transpose.ROTATE_270,
    }.get(int(round(rotation)))
    image = image.transpose(turn) if turn is not None else image
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_size(source, width: int, height: int) -> None:
    if min(width, height) < 1:
        raise InputError(f"video {source} has empty frames ({width}x{height} pixels)")
    if width * height > MAX_FRAME_PIXELS:
        raise InputError(
            f"video {source} has {width}x{height} pixel frames, too large to decode safely; use a smaller video"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise InputError(
            f"video {source} is {width}x{height} pixels: an aspect ratio over {MAX_ASPECT}:1, which "
            "Qwen-VL models cannot take; crop it"
        )


def _check_budget(video: Video, budget: int | None) -> Video:
    if budget is None:
        from .memory import device_budget

        budget = device_budget()["available"]
    need = video.decode_bytes()
    if budget and need > budget:
        from .memory import fmt_bytes

        raise InputError(
            f"video {video.source}: decoding {video.num_frames} frames of {video.width}x{video.height} "
            f"pixels takes about {fmt_bytes(need)} but {fmt_bytes(budget)} is available; take fewer "
            "frames (lower fps or max_frames, --fps / --max-frames) or use a smaller video"
        )
    return video


def open_video(
    source,
    fps: float | None = None,
    max_frames: int | None = None,
    *,
    factor: int = FRAME_FACTOR,
    budget: int | None = None,
) -> Video:
    """Plan a video (nothing is decoded; see the module docstring): a video file (path), a folder of frames
    (path) or a list / tuple of images (paths, PIL images, uint8 arrays). ``fps``: the sampling rate of a video
    file, or the rate a folder's / list's frames were taken at (default 2.0); ``max_frames``: at most this many
    frames (default 768). ``budget``: bytes the decoded frames may take (default: the memory available)."""
    if isinstance(source, Video):
        return source
    fps, max_frames = _check_options(fps, max_frames)
    fps, max_frames = fps or DEFAULT_FPS, max_frames or MAX_FRAMES
    if isinstance(source, (list, tuple)):
        return _check_budget(_from_frames(list(source), fps, max_frames, factor), budget)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"a video is a file, a folder of frames or a list of images, got {type(source).__name__}")
    try:
        st = os.stat(source)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"video not found: {source}") from None
    except OSError as e:
        raise InputError(f"cannot read video {source}: {_one_line(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        video = _from_folder(source, fps, max_frames, factor)
    elif stat.S_ISREG(st.st_mode):
        video = _from_file(source, fps, max_frames, factor)
    else:
        raise InputError(
            f"video {source} is not a regular file (a pipe, socket or device); give a video file or a folder of frames"
        )
    return _check_budget(video, budget)


def load_video(
    source,
    fps: float | None = None,
    max_frames: int | None = None,
    *,
    factor: int = FRAME_FACTOR,
    budget: int | None = None,
) -> tuple:
    """``(frames, fps)``: the sampled frames (RGB PIL images) and the rate they stand for (see `open_video`)."""
    video = open_video(source, fps, max_frames, factor=factor, budget=budget)
    return video.decode(), video.fps


def open_videos(
    videos: Sequence, fps=None, max_frames=None, *, factor: int = FRAME_FACTOR, budget: int | None = None
) -> list[Video]:
    """`open_video` of each video (`Video`s are kept as they are)."""
    return [open_video(v, fps, max_frames, factor=factor, budget=budget) for v in videos]


def _subsample(total: int, fps: float, max_frames: int) -> tuple:
    if total <= max_frames:
        return list(range(total)), fps
    return even_indices(total, max_frames), fps * max_frames / total


def _hw(frame) -> tuple:
    """(height, width) of a frame as the model sees it, without decoding (paths: the header)."""
    from .images import ImageFile, open_image

    if isinstance(frame, (str, os.PathLike)):
        frame = open_image(frame)
    if isinstance(frame, (ImageFile, Image.Image)):
        return frame.size[1], frame.size[0]
    if isinstance(frame, np.ndarray) and frame.ndim >= 2:
        return frame.shape[0], frame.shape[1]
    raise InputError(f"a video frame must be a PIL image, a uint8 array or an image path, got {type(frame).__name__}")


def _from_frames(frames: list, fps: float, max_frames: int, factor: int) -> Video:
    from .images import open_image

    if not frames:
        raise InputError("a video needs at least one frame; got an empty list")
    indices, rate = _subsample(len(frames), fps, max_frames)
    items = list(frames)
    for i in indices:  # headers of the frames taken only
        if isinstance(items[i], (str, os.PathLike)):
            items[i] = open_image(items[i])
    sizes = {i: _hw(items[i]) for i in indices}
    h, w = sizes[indices[0]]
    for i in indices:
        if sizes[i] != (h, w):
            raise InputError(
                f"video frame {i} is {sizes[i][1]}x{sizes[i][0]} pixels but frame {indices[0]} is "
                f"{w}x{h}; every frame of a video must have the same size"
            )
    _check_size("(list of frames)", w, h)
    return Video("(list of frames)", "frames", h, w, len(frames), indices, rate, items=items, factor=factor)


def _from_folder(folder, fps: float, max_frames: int, factor: int) -> Video:
    from .images import open_image

    try:
        entries = sorted(os.scandir(folder), key=lambda e: _natural_key(e.name))
    except OSError as e:
        raise InputError(f"cannot read video folder {folder}: {_one_line(e)}") from None
    extensions = set(Image.registered_extensions()) | {".heic", ".heif"}
    files = []
    for e in entries:
        if e.name.startswith("."):
            continue  # .DS_Store and the like
        path = os.path.join(folder, e.name)
        try:
            mode = os.stat(path).st_mode  # links followed: a link to a frame is a frame
        except OSError:
            raise InputError(f"video folder {folder}: {e.name} is a broken link or cannot be read") from None
        if stat.S_ISDIR(mode):
            raise InputError(
                f"video folder {folder} holds a subfolder {e.name}; a folder of frames holds only image files"
            )
        if not stat.S_ISREG(mode):
            raise InputError(
                f"video folder {folder}: {e.name} is not a regular file (a pipe, socket or device); a "
                "folder of frames holds only image files"
            )
        if Path(e.name).suffix.lower() in extensions:
            files.append(path)
    if not files:
        raise InputError(f"video folder {folder} holds no image files; put the frames in it as JPEG or PNG files")
    indices, rate = _subsample(len(files), fps, max_frames)
    first = open_image(files[indices[0]])
    h, w = first.height, first.width
    for i in indices[1:]:
        im = open_image(files[i])
        if (im.height, im.width) != (h, w):
            raise InputError(
                f"video folder {folder}: {files[i]} is {im.width}x{im.height} pixels but "
                f"{files[indices[0]]} is {w}x{h}; every frame of a video must have the same size"
            )
    _check_size(folder, w, h)
    return Video(str(folder), "folder", h, w, len(files), indices, rate, items=files, factor=factor)


def _from_file(path, fps: float, max_frames: int, factor: int) -> Video:
    av = _av()
    with open_regular(path, what="video") as f:
        try:
            with av.open(f, "r") as container:
                if not container.streams.video:
                    raise InputError(f"video {path} has no video stream")
                stream = container.streams.video[0]
                ctx = stream.codec_context
                width, height = int(ctx.width or 0), int(ctx.height or 0)
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                rate = float(rate) if rate else 0.0
                total = int(stream.frames or 0)
                if total <= 0 and rate > 0:  # the container does not say: from the duration
                    if stream.duration and stream.time_base:
                        total = round(float(stream.duration * stream.time_base) * rate)
                    elif container.duration:
                        total = round(container.duration / av.time_base * rate)
                first = next(container.decode(stream), None)  # one frame: the stream decodes, and its rotation
                rotation = int(round(getattr(first, "rotation", 0) or 0)) if first is not None else 0
                if first is not None and first.width * first.height:
                    width, height = first.width, first.height
                if total <= 0:  # still unknown: count the packets (no decoding)
                    container.seek(0)
                    total = sum(1 for p in container.demux(stream) if p.size)
        except (InputError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            raise InputError(
                f"cannot read video {path}: not a video PyAV can read, or corrupt ({_one_line(e)})"
            ) from None
    if total <= 0:
        raise InputError(f"video {path} has no frames")
    if not (math.isfinite(rate) and 0 < rate <= 10_000):
        raise InputError(f"video {path} has no valid frame rate ({rate}); give a folder of its frames instead")
    if first is None:
        raise InputError(f"cannot read video {path}: no frame decodes (a corrupt or truncated file)")
    _check_size(path, width, height)
    if abs(rotation) in (90, 270):  # shown on its side: the model sees it upright
        width, height = height, width
    n = sample_count(total, rate, fps, max_frames, factor)
    return Video(
        str(path),
        "file",
        height,
        width,
        total,
        even_indices(total, n),
        n / total * rate,
        rate=rate,
        factor=factor,
        rotation=rotation,
    )
