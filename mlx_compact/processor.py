"""Qwen-VL processor: prompt text + images / videos -> input_ids and patchified pixels (numpy).

Matches transformers 5.23's PIL image processor (`Qwen2VLImageProcessorPil`, what `AutoProcessor`
picks when torchvision is absent): `smart_resize`, PIL bicubic on uint8, x/255, normalize, patchify
with the frame repeated `temporal_patch_size` times, rows block-major over merge units.

Videos are lists of frames, used as given (`mlx_compact.video` samples them from files). They are resized with PIL too;
transformers resizes video frames with torchvision, whose bicubic can differ by one uint8 level.
Qwen3-VL videos get per-frame timestamps `<{t:.1f} seconds>` computed from `video_fps`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .files import InputError, checkpoint_root, read_bytes, read_json, read_text
from .models.config import token_ids
from .template import render

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(h, w) divisible by `factor`, with h*w in [min_pixels, max_pixels], aspect ratio kept (transformers)."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = 128 * 32 * 32,
    max_pixels: int = 768 * 32 * 32,
) -> tuple[int, int]:
    """Qwen3-VL's video smart_resize: the pixel budget counts all frames (transformers)."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image) -> Image.Image:
    """PIL RGB image from a PIL image (any mode), a uint8 numpy array (HW, HWC with 1/3/4 channels), a path or
    an `mlx_compact.images.ImageFile`.

    Transparency is composited onto white, as transformers does; files are decoded by
    `mlx_compact.images` (EXIF rotation applied, 16-bit greyscale scaled to 8 bits).
    """
    from .images import ImageFile, read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, ImageFile):
        return image.decode()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 HWC, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"numpy images must be HW or HWC with 1, 3 or 4 channels, got shape {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"unsupported image type {type(image).__name__}; pass a PIL image, a uint8 array or a path")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _read_json(path: Path, root=None) -> dict:
    """A JSON object file of the checkpoint, confined to ``root`` (see `files.read_json`); {} when absent."""
    try:
        return read_json(path, root)
    except FileNotFoundError:
        return {}


# what AutoTokenizer may read; it reads verified copies of these, so it never opens a link, FIFO or device
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "config.json",
)


def _load_tokenizer(path: Path, root: Path):
    """The checkpoint's tokenizer, loaded by transformers from checked copies of its files (no remote code)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as copy:
        for name in TOKENIZER_FILES:
            try:
                if name == "tokenizer_config.json":  # transformers 4.x opens the paths in its *_file keys
                    cfg = read_json(path / name, root)
                    data = json.dumps({k: v for k, v in cfg.items() if not k.endswith("_file")}).encode()
                else:
                    data = read_bytes(path / name, root, "tokenizer file")
            except FileNotFoundError:
                continue
            Path(copy, name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(copy, trust_remote_code=False)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the Rust tokenizer's panics are BaseExceptions
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise InputError(f"cannot load the tokenizer of {path}: {reason}; download the checkpoint again") from None


def _read_chat_template(path: Path, root: Path) -> tuple[str | None, str | None]:
    """The checkpoint's own chat template file (chat_template.jinja, else chat_template.json) and its path."""
    try:
        return read_text(path / "chat_template.jinja", root, "chat template"), str(path / "chat_template.jinja")
    except FileNotFoundError:
        pass
    template = _read_json(path / "chat_template.json", root).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise InputError(
            f"chat_template.json {path / 'chat_template.json'}: chat_template is "
            f"{type(template).__name__}, not text; fix the file or download the checkpoint again"
        )
    return template, str(path / "chat_template.json")


class _PixelConfig:
    """Resize and normalization settings from a (video_)preprocessor_config.json, validated.

    ``name`` is the file the settings come from; keys in ``inherited`` came from config.json instead.
    """

    def __init__(
        self,
        cfg: dict,
        default_size: tuple[int, int],
        default_mean,
        default_std,
        name: str = "preprocessor_config.json",
        inherited=(),
    ):
        def bad(key, value, expected):
            where = "config.json vision_config" if key in inherited else name
            return InputError(
                f"{where}: {key} is {value!r}, not {expected}; fix the file or download the checkpoint again"
            )

        def integer(key, value, high):
            if type(value) is float and value.is_integer():
                value = int(value)
            if type(value) is not int or not 1 <= value <= high:
                raise bad(key, value, f"an integer from 1 to {high:,}")
            return value

        def number(key, value, positive=False):
            if type(value) not in (int, float) or not math.isfinite(value) or (positive and value <= 0):
                raise bad(key, value, "a positive number" if positive else "a finite number")
            return float(value)

        def triple(key, value, positive=False):
            if type(value) in (int, float):
                value = [value] * 3
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise bad(key, value, "a list of 3 numbers (one per RGB channel)")
            return np.array([number(key, v, positive) for v in value], dtype=np.float32)  # [C]

        self.patch_size = integer("patch_size", cfg.get("patch_size"), 1024)
        self.temporal_patch_size = integer("temporal_patch_size", cfg.get("temporal_patch_size"), 16)
        self.merge_size = integer("merge_size", cfg.get("merge_size"), 16)
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise bad("size", size, "an object with shortest_edge and longest_edge")
        pixels = {}
        for key, edge, default in (
            ("min_pixels", "shortest_edge", default_size[0]),
            ("max_pixels", "longest_edge", default_size[1]),
        ):
            field = key if cfg.get(key) else f"size.{edge}" if size.get(edge) else key
            pixels[key] = integer(field, cfg.get(key) or size.get(edge) or default, 2**31)
        self.min_pixels, self.max_pixels = pixels["min_pixels"], pixels["max_pixels"]
        if self.min_pixels > self.max_pixels:
            raise InputError(
                f"{name}: min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}; fix the "
                "file or download the checkpoint again"
            )
        self.rescale_factor = number("rescale_factor", cfg.get("rescale_factor", 1 / 255), positive=True)
        self.mean = triple("image_mean", cfg.get("image_mean", default_mean))  # [C]
        self.std = triple("image_std", cfg.get("image_std", default_std), positive=True)  # [C]

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def normalize(self, image: Image.Image, height: int, width: int) -> np.ndarray:
        """Resize (PIL bicubic on uint8), rescale and normalize -> float32 [C, H, W]."""
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)  # [H, W, C]
        x = (x - self.mean) / self.std  # [H, W, C]
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [C, H, W]

    def patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """[F, C, H, W] frames -> rows [t*gh*gw, C*T*P*P] block-major over merge units, and grid (t, gh, gw)."""
        T, P, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -frames.shape[0] % T:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])  # [F', C, H, W]
        f, c, h, w = frames.shape
        gt, gh, gw = f // T, h // P, w // P
        x = frames.reshape(gt, T, c, gh // m, m, P, gw // m, m, P)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, T, P, P]
        return x.reshape(gt * gh * gw, c * T * P * P), (gt, gh, gw)  # [N, C*T*P*P]


class Processor:
    """Turns a prompt and images / videos into model inputs for a Qwen-VL checkpoint."""

    def __init__(
        self,
        path,
        tokenizer,
        config: dict,
        image_cfg: dict,
        video_cfg: dict,
        chat_template,
        generation_config: dict | None = None,
        chat_template_source: str | None = None,
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.config = config
        self.model_type = config.get("model_type", "qwen2_vl")
        text_cfg = config.get("text_config") or config
        vision_cfg = config.get("vision_config") or {}
        qwen3 = self.model_type.startswith("qwen3")
        # defaults (config.json, then transformers' classes), used only where the json files are silent
        geometry = {
            "patch_size": vision_cfg.get("patch_size", 14),
            "temporal_patch_size": vision_cfg.get("temporal_patch_size", 2),
            "merge_size": vision_cfg.get("spatial_merge_size", 2),
        }
        image_file = "preprocessor_config.json"
        video_file = image_file if video_cfg is image_cfg else "video_preprocessor_config.json"
        image_kw = dict(name=image_file, inherited=set(geometry) - set(image_cfg))
        video_kw = dict(name=video_file, inherited=set(geometry) - set(video_cfg))
        image_cfg, video_cfg = {**geometry, **image_cfg}, {**geometry, **video_cfg}
        self.image = _PixelConfig(image_cfg, (56 * 56, 28 * 28 * 1280), CLIP_MEAN, CLIP_STD, **image_kw)
        if qwen3:
            self.video = _PixelConfig(video_cfg, (128 * 32 * 32, 768 * 32 * 32), (0.5,) * 3, (0.5,) * 3, **video_kw)
        else:
            self.video = _PixelConfig(video_cfg, (128 * 28 * 28, 768 * 28 * 28), CLIP_MEAN, CLIP_STD, **video_kw)
        self.chat_template = chat_template  # the template's text
        self.chat_template_source = chat_template_source or "of the tokenizer"  # its file, for messages

        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        ids = token_ids(config)  # the model's own reading of them (models.config), so both always agree
        self.image_token_id, self.video_token_id = ids["image_token_id"], ids["video_token_id"]
        self.vision_start_token_id, self.vision_end_token_id = ids["vision_start_token_id"], ids["vision_end_token_id"]
        self.spatial_merge_size = int(vision_cfg.get("spatial_merge_size", self.image.merge_size))
        tps = vision_cfg.get("tokens_per_second", text_cfg.get("tokens_per_second", config.get("tokens_per_second")))
        self.tokens_per_second = float(tps) if tps is not None else 2.0

        eos = []
        for where, source in (
            ("config.json", config.get("eos_token_id")),
            ("config.json text_config", text_cfg.get("eos_token_id")),
            ("generation_config.json", (generation_config or {}).get("eos_token_id")),
            ("the tokenizer", tokenizer.eos_token_id),
        ):
            if source is not None:
                ids = source if isinstance(source, list) else [source]
                if not all(type(e) is int and e >= 0 for e in ids):
                    raise InputError(
                        f"{where}: eos_token_id is {source!r}, not a token id or a list of them; fix "
                        "the file or download the checkpoint again"
                    )
                eos += ids
        self.eos_token_ids = sorted(set(eos))

    @classmethod
    def from_pretrained(cls, path) -> Processor:
        """Load from a local checkpoint directory (config.json, preprocessor_config.json, tokenizer files).

        Every file is read confined to the checkpoint (links out of it, FIFOs and devices are refused); a
        missing optional file falls back to defaults, a corrupt one is an `InputError` naming it.
        """
        path = Path(path)
        root = checkpoint_root(path)
        config = _read_json(path / "config.json", root)
        image_cfg = _read_json(path / "preprocessor_config.json", root)
        video_cfg = _read_json(path / "video_preprocessor_config.json", root) or image_cfg
        generation_config = _read_json(path / "generation_config.json", root)
        chat_template, source = _read_chat_template(path, root)
        tokenizer = _load_tokenizer(path, root)
        if not chat_template:
            chat_template, source = tokenizer.chat_template, str(path / "tokenizer_config.json")
            if isinstance(chat_template, dict):  # named templates: the default one, as transformers picks
                chat_template = chat_template.get("default")
        return cls(path, tokenizer, config, image_cfg, video_cfg, chat_template, generation_config, source)

    # ------------------------------------------------------------ sizes

    def image_resized_size(self, height: int, width: int, *, min_pixels=None, max_pixels=None) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        c = self.image
        return smart_resize(height, width, c.factor, min_pixels or c.min_pixels, max_pixels or c.max_pixels)

    def image_size_tokens(self, height: int, width: int, max_pixels=None, min_pixels=None) -> int:
        """Number of merged visual tokens an image of this size becomes (no pixels needed)."""
        h, w = self.image_resized_size(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        return (h // self.image.factor) * (w // self.image.factor)

    def video_resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the frames of a video are resized to."""
        c = self.video
        if self.model_type.startswith("qwen3"):
            return smart_resize_video(
                num_frames, height, width, c.temporal_patch_size, c.factor, c.min_pixels, c.max_pixels
            )
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    # ------------------------------------------------------------ pixels

    def preprocess_images(self, images, *, min_pixels=None, max_pixels=None) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (pixel_values float32 [N, C*T*P*P], grid_thw int32 [n, 3])."""
        rows, grids = [], []
        for image in images:
            image = to_rgb(image)
            h, w = self.image_resized_size(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
            x = self.image.normalize(image, h, w)  # [C, H, W]
            frames = np.broadcast_to(x, (self.image.temporal_patch_size, *x.shape))  # [T, C, H, W]
            patches, grid = self.image.patchify(frames)
            rows.append(patches)
            grids.append(grid)
        return np.concatenate(rows).astype(np.float32), np.array(grids, dtype=np.int32)

    def preprocess_videos(self, videos) -> tuple[np.ndarray, np.ndarray]:
        """Videos (each a list of frames) -> (pixel_values_videos float32 [N, C*T*P*P], video_grid_thw int32 [n, 3])."""
        rows, grids = [], []
        for frames in videos:
            frames = [to_rgb(f) for f in frames]
            if not frames:
                raise ValueError("a video needs at least one frame")
            if len({f.size for f in frames}) != 1:
                raise ValueError("all frames of a video must have the same size")
            h, w = self.video_resized_size(len(frames), frames[0].height, frames[0].width)
            x = np.stack([self.video.normalize(f, h, w) for f in frames])  # [F, C, H, W]
            patches, grid = self.video.patchify(x)
            rows.append(patches)
            grids.append(grid)
        return np.concatenate(rows).astype(np.float32), np.array(grids, dtype=np.int32)

    def _video_placeholder(self, grid, num_frames: int, fps: float) -> str:
        t, h, w = (int(v) for v in grid)
        per_frame = h * w // self.video.merge_size**2
        if not self.model_type.startswith("qwen3"):
            return self.video_token * (t * per_frame)
        T = self.video.temporal_patch_size
        frames = list(range(num_frames)) + [num_frames - 1] * (-num_frames % T)  # padded as the pixels are
        out = []
        for ti in range(t):  # timestamp = mean time of the first and last frame of the temporal patch
            stamp = (frames[ti * T] / fps + frames[ti * T + T - 1] / fps) / 2
            out.append(
                f"<{stamp:.1f} seconds>"
                + self.vision_start_token
                + self.video_token * per_frame
                + self.vision_end_token
            )
        return "".join(out)

    # ------------------------------------------------------------ main entry

    def __call__(self, text, images=None, videos=None, *, min_pixels=None, max_pixels=None, video_fps=2.0) -> dict:
        """Tokenize one prompt and process its images / videos.

        `text` holds one `<|image_pad|>` per image and one `<|video_pad|>` per video (as the chat
        template renders them); each is expanded to the number of merged tokens of its image/video.
        `min_pixels` / `max_pixels` override the image budget; `video_fps` is the rate the frames
        were sampled at (Qwen2.5-VL temporal positions, Qwen3-VL timestamps): one number, or one per video.

        Returns a dict of numpy arrays: `input_ids` int32 [1, L]; with images `pixel_values` float32
        [N, C*T*P*P] and `grid_thw` int32 [n, 3]; with videos `pixel_values_videos`, `video_grid_thw`
        and `second_per_grid_ts` (list of float, one per video).
        """
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError(f"one prompt at a time: got a list of {len(text)} texts")
            text = text[0]
        images = list(images) if images is not None else []
        videos = list(videos) if videos is not None else []
        if images and isinstance(images[0], (list, tuple)):
            raise ValueError("images must be a flat list of images (use videos= for lists of frames)")
        for token, items, what in ((self.image_token, images, "image"), (self.video_token, videos, "video")):
            if text.count(token) != len(items):
                raise ValueError(
                    f"the text has {text.count(token)} {token} placeholder(s) but {len(items)} "
                    f"{what}(s) were given; use build_prompt / apply_chat_template to make the text"
                )
        fps = list(video_fps) if isinstance(video_fps, (list, tuple)) else [video_fps] * len(videos)
        if len(fps) != len(videos) or not all(
            isinstance(f, (int, float, np.number)) and math.isfinite(f) and f > 0 for f in fps
        ):
            raise ValueError(f"video_fps must be a number > 0, or a list of one per video, got {video_fps!r}")

        out = {}
        if images:
            out["pixel_values"], out["grid_thw"] = self.preprocess_images(
                images, min_pixels=min_pixels, max_pixels=max_pixels
            )
        if videos:
            out["pixel_values_videos"], out["video_grid_thw"] = self.preprocess_videos(videos)
            out["second_per_grid_ts"] = [self.video.temporal_patch_size / f for f in fps]

        merge = self.image.merge_size**2
        parts = []
        image_iter = iter(out.get("grid_thw", []))
        video_iter = iter(zip(out.get("video_grid_thw", []), [len(v) for v in videos], fps))
        for piece in _split_keep(text, (self.image_token, self.video_token)):
            if piece == self.image_token:
                parts.append(self.image_token * (int(np.prod(next(image_iter))) // merge))
            elif piece == self.video_token:
                parts.append(self._video_placeholder(*next(video_iter)))
            else:
                parts.append(piece)
        ids = self.tokenizer("".join(parts), add_special_tokens=False)["input_ids"]
        out["input_ids"] = np.array([ids], dtype=np.int32)  # [1, L]
        return out

    # ------------------------------------------------------------ text

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """Render chat messages with the checkpoint's chat template.

        With the Qwen templates an image renders as <|vision_start|><|image_pad|><|vision_end|>. The text
        is what transformers' ``apply_chat_template`` renders; the template runs sandboxed and bounded
        in time and size (`mlx_compact.template.render`): a hostile or broken one is an `InputError`.
        """
        if not self.chat_template:
            raise InputError(
                f"the checkpoint {self.path} has no chat template (no chat_template.jinja, "
                "chat_template.json or chat_template in tokenizer_config.json); add one"
            )
        return render(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.tokenizer.special_tokens_map,
            name=self.chat_template_source,
        )

    def build_prompt(self, prompt: str, n_images: int = 0, n_videos: int = 0) -> str:
        """A one-turn user prompt with `n_images` images and `n_videos` videos before the text."""
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
        return self.apply_chat_template([{"role": "user", "content": content}])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids -> text."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _split_keep(text: str, tokens) -> list[str]:
    """Split `text` into pieces, keeping each occurrence of the given tokens as its own piece."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        hit = next((t for t in tokens if text.startswith(t, i)), None)
        if hit is None:
            i += 1
            continue
        pieces += [text[start:i], hit]
        i += len(hit)
        start = i
    pieces.append(text[start:])
    return [p for p in pieces if p]
