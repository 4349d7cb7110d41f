"""Qwen3.5 (Qwen3.5-0.8B .. 27B, Qwen3.6-27B, Qwen3.8-27B): the Qwen3-VL vision tower without DeepStack and a
hybrid LLM in which most layers are Gated DeltaNet (linear attention with a fixed-size state) and every few a
gated full attention (``layer_types``; see `models.language`).

The model owns its cache (`Model.make_cache`): a fixed linear state per Gated DeltaNet layer, a KV cache
(growing, or fixed-size and rotating, float or 8/4-bit) per attention layer.

``sanitize`` takes the three layouts in the wild: the Qwen release (``model.language_model.*``, ``mtp.*``
multi-token-prediction tensors, which are dropped), transformers-5 saves (the same names, no ``mtp.*``), both
with conv1d [C, 1, K], patch embed [D, 3, T, P, P] and zero-centred norms holding ``w``; and mlx-community's
(mlx-vlm's converter: ``language_model.*`` / ``vision_tower.*``, conv1d [C, K, 1], patch embed channels-last,
norms holding ``1 + w``). Which one is decided once per checkpoint, so the 1 is added exactly once.
"""

from .base import VLModel
from .qwen3_vl import Qwen3VisionTower

ZERO_CENTRED = (  # the (1 + w) RMSNorms; not linear_attn.norm (a plain weight) nor the vision tower's LayerNorms
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".self_attn.q_norm.weight",
    ".self_attn.k_norm.weight",
    "language_model.model.norm.weight",
)
HF_PREFIXES = ("model.", "lm_head.", "visual.")


class Model(VLModel):
    tower_class = Qwen3VisionTower

    @property
    def layer_types(self) -> list[str]:
        """ "linear_attention" or "full_attention" for each LLM layer."""
        return list(self.config.text.layer_types)

    def make_cache(
        self, max_kv_size: int | None = None, kv_bits: int | None = None, kv_group_size: int | None = None
    ) -> list:
        """One cache per LLM layer: a `LinearCache` (conv + float32 recurrent state, fixed size) for each linear
        layer, and for each attention layer a growing KV cache, or a fixed-size rotating one of ``max_kv_size``
        slots with a pinned prefix (``kv_bits`` 8 / 4: quantized, in groups of ``kv_group_size``)."""
        from ..cache import LinearCache, kv_cache  # the runtime's classes; the model only builds the list

        t = self.config.text
        return [
            LinearCache() if t.is_linear(i) else kv_cache(t.head_dim, max_kv_size, kv_bits, kv_group_size)
            for i in range(t.num_hidden_layers)
        ]

    def sanitize(self, weights: dict) -> dict:
        """Any of the three layouts (see the module) -> ours: ``mtp.*`` dropped, conv1d [C, K, 1], and the
        zero-centred norms shifted by 1 when the checkpoint is a Hugging Face one: named as Hugging Face names
        them, or with its conv1d in the [C, 1, K] layout (decided once for all). ``mtp.*`` tensors decide
        nothing: mlx-vlm can write them beside converted weights (as mlx-vlm, which also ignores them here)."""
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
        hf = any(k.startswith(HF_PREFIXES) for k in weights) or any(
            k.endswith("linear_attn.conv1d.weight") and v.ndim == 3 and v.shape[1] == 1 and v.shape[2] != 1
            for k, v in weights.items()
        )
        weights = super().sanitize(weights)
        for k, v in weights.items():
            if k.endswith("linear_attn.conv1d.weight") and v.ndim == 3 and v.shape[1] == 1 and v.shape[2] != 1:
                weights[k] = v.swapaxes(1, 2)  # [C, 1, K] -> [C, K, 1]
            if hf and k.endswith(ZERO_CENTRED):
                weights[k] = v + 1
        return weights
