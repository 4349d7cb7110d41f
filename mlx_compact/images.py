"""Image files: read the header first, plan, then decode no more pixels than the plan allows.

`open_image` reads only a file's header (size after EXIF orientation, format, pixel mode) and refuses
what cannot be a picture: a FIFO or device, an unknown or corrupt format, a decompression bomb, an
aspect ratio the models cannot take. `ImageFile.decode` then turns it into an RGB PIL image: EXIF
rotation applied, transparency on white, 16/32-bit greyscale scaled to 8 bits, and a JPEG decoded at
1/2, 1/4 or 1/8 of its size (DCT scaling, `Image.draft`) when ``scale`` says so.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .files import InputError, open_regular

MAX_ASPECT = 200  # transformers' smart_resize refuses more
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _register_heif() -> None:
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:
        pass


def _unreadable(path) -> InputError:
    hint = ""
    if str(path).lower().endswith((".heic", ".heif")):
        hint = " (HEIC needs `pip install pillow-heif`, or export the photo as JPEG)"
    return InputError(
        f"cannot read image {path}: Pillow does not recognise it (a corrupt file, or an unsupported "
        f"format or pixel mode){hint}"
    )


class _Opened:
    """``with _Opened(path) as im``: Image.open on a regular file, its errors as one-line `InputError`s."""

    def __init__(self, path):
        self.path = path

    def __enter__(self) -> Image.Image:
        _register_heif()
        try:
            self.file = open_regular(self.path, what="image")
        except (FileNotFoundError, NotADirectoryError):
            raise InputError(f"image not found: {self.path}") from None
        except PermissionError:
            raise InputError(f"cannot read image {self.path}: permission denied") from None
        try:
            with warnings.catch_warnings():  # sizes are planned here; Pillow still refuses real bombs
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.image = Image.open(self.file)
        except BaseException as e:
            self.file.close()
            raise _image_error(self.path, e) from None
        return self.image

    def __exit__(self, *exc):
        self.file.close()  # the image itself stays usable once loaded
        if exc[1] is not None and not isinstance(exc[1], (InputError, KeyboardInterrupt, MemoryError)):
            raise _image_error(self.path, exc[1]) from None


def _image_error(path, e: BaseException) -> BaseException:
    if isinstance(e, (InputError, KeyboardInterrupt, SystemExit, MemoryError)):
        return e
    if isinstance(e, UnidentifiedImageError):
        return _unreadable(path)
    if isinstance(e, Image.DecompressionBombError):
        return InputError(f"image {path} is too large to decode safely ({e}); use a smaller image")
    return InputError(
        f"cannot read image {path}: corrupt or truncated ({' '.join(str(e).split()) or type(e).__name__})"
    )


@dataclass
class ImageFile:
    """An image file known from its header: ``height`` / ``width`` as the model will see it (EXIF rotation
    applied), Pillow's ``format`` and ``mode``. ``scale`` (1, 2, 4 or 8) is the JPEG decode reduction the
    memory plan chose (`mlx_compact.generate.check_memory` sets it)."""

    path: str
    height: int
    width: int
    format: str
    mode: str
    orientation: int = 1  # EXIF orientation (1: as stored)
    scale: int = 1
    decoded_bytes: int = 0  # after `decode`: the bytes its decoded pixels took

    @property
    def size(self) -> tuple:  # PIL's (width, height), so code that takes PIL images takes this too
        return self.width, self.height

    def max_scale(self, height: int, width: int) -> int:
        """The largest JPEG reduction that still decodes at least ``height`` x ``width`` pixels."""
        if self.format != "JPEG":
            return 1
        return next(s for s in (8, 4, 2, 1) if self.height // s >= height and self.width // s >= width)

    def decode_bytes(self, scale: int | None = None) -> int:
        """Peak bytes of decoding at ``scale``: the decoded pixels, the rotated copy (EXIF) and the
        conversions to RGB (Pillow keeps multi-band pixels in 4 bytes)."""
        s = scale or self.scale
        pixels = -(-self.height // s) * -(-self.width // s)
        per = _PIXEL_BYTES.get(self.mode, 4)
        per += 4 if self.orientation != 1 else 0
        per += 0 if self.mode == "RGB" else 12  # e.g. RGBA: composited on white, then converted
        return pixels * per

    def decode(self) -> Image.Image:
        """The RGB image (see the module docstring)."""
        import numpy as np

        from .processor import to_rgb

        with _Opened(self.path) as im:
            if self.scale > 1 and im.format == "JPEG":
                w, h = (self.height, self.width) if self.orientation in ROTATED else (self.width, self.height)
                im.draft("RGB" if im.mode != "L" else "L", (w // self.scale, h // self.scale))
            im.load()
            mode = im.mode
            self.decoded_bytes = im.width * im.height * _PIXEL_BYTES.get(mode, 4)
            if self.orientation != 1:
                im = ImageOps.exif_transpose(im)
            if mode.startswith("I") or mode == "F":  # 16/32-bit greyscale: scale to 8 bits instead of clipping
                a = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(a / 257.0 if a.max() > 255 else a, 0, 255).astype(np.uint8), "L")
            try:
                return to_rgb(im)
            except (ValueError, OSError) as e:
                raise InputError(
                    f"image {self.path} has pixel mode {mode}, which cannot be converted to RGB ({e})"
                ) from None


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation from what the header holds (``getexif`` would decode a PNG to look further)."""
    try:
        if im.format == "TIFF":
            return int(im.tag_v2.get(0x0112, 1))
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except Exception:  # a corrupt EXIF block: Pillow's exif_transpose ignores it too
        return 1


def open_image(path: str | os.PathLike) -> ImageFile:
    """Read an image file's header (nothing is decoded) and check it is an image the models can take."""
    with _Opened(path) as im:
        w, h = im.size
        orientation = _orientation(im)
        if orientation in ROTATED:
            w, h = h, w
        info = ImageFile(str(path), h, w, im.format or "", im.mode, orientation)
    if min(h, w) < 1:
        raise InputError(f"image {path} is empty ({w}x{h} pixels)")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise InputError(
            f"image {path} is {w}x{h} pixels: an aspect ratio over {MAX_ASPECT}:1, which Qwen-VL "
            "models cannot take; crop it"
        )
    return info


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into RGB (see the module docstring)."""
    return open_image(path).decode()
