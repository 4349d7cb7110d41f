"""What the Qwen-VL models share: splicing visual tokens into text, positions, loading hook."""

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .language import LanguageModel, dense_mlp
from .rope_index import PER_FRAME_VIDEO, get_rope_index, visual_runs
from .vision import VisionOutput


def _grid_list(grid) -> list[tuple]:
    if grid is None:
        return []
    rows = grid.tolist() if hasattr(grid, "tolist") else grid
    return [tuple(int(v) for v in g) for g in rows]


class WeightsError(ValueError):
    """The checkpoint's tensors cannot be mapped onto the model (the message says why)."""


class VLModel(nn.Module):
    """A Qwen-VL model: ``vision_tower`` and ``language_model``, parameter names as mlx-vlm's.

    ``tower_class``: the vision tower; ``text_mlp``: the MLP of each LLM layer (``(cfg, layer) -> module``).
    ``default_compaction``: the visual-token compaction (an `mlx_compact.compaction.Compaction`) that the
    runtime (``generate``, ``stream_generate``, ``prepare``, ``ChatSession``) applies when a call gives none;
    None (no compaction) unless ``load(compaction=...)`` or the caller sets it. The model itself never reads it.
    """

    tower_class = None
    text_mlp = staticmethod(dense_mlp)
    default_compaction = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.vision_tower = self.tower_class(config.vision)
        self.language_model = LanguageModel(config.text, self.text_mlp)

    @property
    def layers(self):
        """The LLM layers this process runs (in a pipeline: its rank's share), one cache each."""
        return self.language_model.owned_layers

    def encode(self, pixel_values: mx.array, grid_thw, **select) -> VisionOutput:
        """Run the vision tower: merged features [M, D] in raster order per image/slice."""
        dtype = self.vision_tower.patch_embed.proj.weight.dtype
        return self.vision_tower(pixel_values.astype(dtype), grid_thw, **select)

    def positions(self, input_ids: Sequence[int], image_grid_thw=(), video_grid_thw=(), second_per_grid_ts=None):
        """Full-sequence M-RoPE ids [3, L] (python lists) and the rope delta."""
        c = self.config
        return get_rope_index(
            list(input_ids),
            [tuple(int(v) for v in g) for g in image_grid_thw],
            [tuple(int(v) for v in g) for g in video_grid_thw],
            image_token_id=c.image_token_id,
            video_token_id=c.video_token_id,
            vision_start_token_id=c.vision_start_token_id,
            spatial_merge_size=c.vision.spatial_merge_size,
            model_type=c.model_type,
            tokens_per_second=c.vision.tokens_per_second,
            second_per_grid_ts=second_per_grid_ts,
        )

    def splice(self, input_ids: Sequence[int], visual: list[mx.array], deepstack: list[list[mx.array]] | None = None):
        """Embeddings [1, L, D] with each run of visual tokens replaced by the next visual block.

        ``visual``: one [n_i, D] block per run of image/video tokens, in order. ``deepstack``: per
        block, a list of [n_i, D] features; returns them as dense [1, L, D] per DeepStack layer.
        Built by concatenation, so any block lengths (compacted or not) work.
        """
        ids = list(input_ids)
        runs = [(start, n) for start, n, _ in self.visual_runs(ids)]
        if len(runs) != len(visual):
            raise ValueError(f"the prompt has {len(runs)} visual blocks but {len(visual)} were encoded")
        embed = self.language_model.model.embed_tokens
        dtype = embed(mx.array([0])).dtype
        pieces, ds_pieces, pos = [], None, 0
        n_ds = len(deepstack[0]) if deepstack else 0
        if n_ds:
            ds_pieces = [[] for _ in range(n_ds)]
        for (start, n), feats, j in zip(runs, visual, range(len(runs))):
            if feats.shape[0] != n:
                raise ValueError(f"visual block {j} has {n} tokens in the prompt but {feats.shape[0]} features")
            if start > pos:
                text = embed(mx.array(ids[pos:start]))
                pieces.append(text)
                for d in range(n_ds):
                    ds_pieces[d].append(mx.zeros_like(text))
            pieces.append(feats.astype(dtype))
            for d in range(n_ds):
                ds_pieces[d].append(deepstack[j][d])
            pos = start + n
        if pos < len(ids):
            text = embed(mx.array(ids[pos:]))
            pieces.append(text)
            for d in range(n_ds):
                ds_pieces[d].append(mx.zeros_like(text))
        h = mx.concatenate(pieces)[None]  # [1, L, D]
        ds = [mx.concatenate(p)[None].astype(h.dtype) for p in ds_pieces] if n_ds else None
        return h, ds

    def split_visual(self, out: VisionOutput, grid_thw, per_frame: bool = False) -> tuple:
        """Split tower output into per-block features (and per-block DeepStack lists).

        One block per image, or per temporal slice when ``per_frame`` (Qwen3-VL videos).
        """
        merge = self.config.vision.spatial_merge_size**2
        if out.units is not None:  # in-encoder compaction: kept units per image (or per temporal slice)
            sizes = []
            for units, (t, h, w) in zip(out.units, grid_thw):
                n, kept = t * h * w // merge, units.tolist()
                slices = range(t) if per_frame else [None]
                sizes += [
                    len(kept) if s is None else sum(s * n // t <= u < (s + 1) * n // t for u in kept) for s in slices
                ]
        elif per_frame:
            sizes = [h * w // merge for t, h, w in grid_thw for _ in range(t)]
        else:
            sizes = [t * h * w // merge for t, h, w in grid_thw]
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        blocks = [out.features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        ds = [[d[a:b] for d in out.deepstack] for a, b in zip(bounds[:-1], bounds[1:])]
        return blocks, ds

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        grid_thw=None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw=None,
        cache=None,
        second_per_grid_ts=None,
    ) -> mx.array:
        """Full-sequence logits [B, L, V] for token ids [B, L] with optional images and videos
        (``second_per_grid_ts``: the processor's, for Qwen2.5-VL's video positions; default 1 s per grid)."""
        input_ids = mx.array(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        grids = {kind: _grid_list(g) for kind, g in (("image", grid_thw), ("video", video_grid_thw))}
        if input_ids.shape[0] != 1 and (grids["image"] or grids["video"]):
            raise ValueError("batches with images are not supported: pass one sequence at a time")
        encoded = {}
        for kind, pv in (("image", pixel_values), ("video", pixel_values_videos)):
            if pv is not None and grids[kind]:
                per_frame = kind == "video" and self.model_type in PER_FRAME_VIDEO
                encoded[kind] = self.split_visual(self.encode(mx.array(pv), grids[kind]), grids[kind], per_frame)
        embeds, positions, deepstack = [], [], None
        for ids in input_ids.tolist():
            visual, vds = [], []
            taken = {"image": 0, "video": 0}
            for kind in self.visual_kinds(ids):
                blocks, ds = encoded[kind]
                visual.append(blocks[taken[kind]])
                vds.append(ds[taken[kind]])
                taken[kind] += 1
            h, deepstack = self.splice(ids, visual, vds if vds and vds[0] else None)
            embeds.append(h)
            positions.append(mx.array(self.positions(ids, grids["image"], grids["video"], second_per_grid_ts)[0]))
        positions = mx.stack(positions, axis=1)  # [3, B, L]
        return self.language_model(mx.concatenate(embeds), positions, cache=cache, deepstack=deepstack)

    def visual_runs(self, ids: Sequence[int]) -> list[tuple]:
        """(start, length, "image" | "video") of every visual block of ``ids``, in prompt order."""
        return visual_runs(ids, self.config.image_token_id, self.config.video_token_id)

    def visual_kinds(self, ids: Sequence[int]) -> list[str]:
        """ "image" or "video" for each run of visual tokens, in prompt order."""
        return [kind for _, _, kind in self.visual_runs(ids)]

    def sanitize(self, weights: dict) -> dict:
        """Map any known checkpoint layout onto this model's parameter names."""
        out = {}
        for k, v in weights.items():
            if "position_ids" in k or "rotary_emb.inv_freq" in k:
                continue
            if k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model.") :]
            elif k.startswith("model.visual."):
                k = "vision_tower." + k[len("model.visual.") :]
            elif k.startswith("visual."):
                k = "vision_tower." + k[len("visual.") :]
            elif k.startswith("model."):
                k = "language_model." + k
            elif k.startswith("lm_head."):
                k = "language_model." + k
            if k.endswith("patch_embed.proj.weight") and v.ndim == 5 and v.shape[-1] != self.config.vision.in_channels:
                v = v.transpose(0, 2, 3, 4, 1)  # torch [O, C, T, P, P] -> [O, T, P, P, C]
            out[k] = v
        if self.config.text.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out
