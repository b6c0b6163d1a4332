"""The named zoo: small Hugging Face models built from configs with random weights, and example inputs.

Used by the demo, the tests, the benchmarks and the CLI (to derive example inputs from a config).
Nothing is downloaded: every model is built from a config. Requires ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# Per model: the config class, the model class, and small config overrides (2 layers, narrow widths).
_SPECS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2Model", dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=128)),
    "bert": ("BertConfig", "BertModel", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                             intermediate_size=128, vocab_size=256, max_position_embeddings=128)),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(n_layers=2, n_heads=4, dim=64, hidden_dim=128,
                                                               vocab_size=256, max_position_embeddings=128)),
    "llama": ("LlamaConfig", "LlamaModel", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                hidden_size=64, intermediate_size=128, vocab_size=256,
                                                max_position_embeddings=128)),
    "mistral": ("MistralConfig", "MistralModel", dict(num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                                                      vocab_size=256, sliding_window=8,
                                                      max_position_embeddings=128)),
    "gemma2": ("Gemma2Config", "Gemma2Model", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   hidden_size=64, head_dim=16, intermediate_size=128,
                                                   vocab_size=256, sliding_window=8, max_position_embeddings=128)),
    "t5": ("T5Config", "T5Model", dict(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=64, d_kv=16,
                                       d_ff=128, vocab_size=256, relative_attention_num_buckets=8)),
    "bart": ("BartConfig", "BartModel", dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                             decoder_attention_heads=4, d_model=64, encoder_ffn_dim=128,
                                             decoder_ffn_dim=128, vocab_size=256, max_position_embeddings=128)),
    "whisper": ("WhisperConfig", "WhisperModel", dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                                      decoder_attention_heads=4, d_model=64, encoder_ffn_dim=128,
                                                      decoder_ffn_dim=128, vocab_size=256, num_mel_bins=16,
                                                      max_source_positions=16, max_target_positions=32,
                                                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                      decoder_start_token_id=1, suppress_tokens=[],
                                                      begin_suppress_tokens=[])),
    "vit": ("ViTConfig", "ViTModel", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                          intermediate_size=128, image_size=32, patch_size=8)),
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel", dict(num_hidden_layers=2, num_attention_heads=4,
                                                                      hidden_size=64, intermediate_size=128,
                                                                      image_size=32, patch_size=8)),
    "swin": ("SwinConfig", "SwinModel", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                                             image_size=32, patch_size=2)),
    "bloom": ("BloomConfig", "BloomModel", dict(n_layer=2, n_head=4, hidden_size=64, vocab_size=256)),
}  # fmt: skip

NAMES = tuple(_SPECS)
# transformers offers only eager attention for these (no sdpa implementation in the model code).
EAGER_ONLY = frozenset({"gemma2", "bloom"})

# Architectures beyond the named zoo, each written differently: multi-query attention with in-place
# ``/=`` (falcon), a clamp of the scores to finfo.min (xglm), einsum over [S, B, H, D] with a relative
# term (xlnet), fused multi-query projections (gpt_bigcode), a learned per-head logit scale on cosine
# scores (swinv2), ALiBi-free GQA with sliding windows (qwen2), sqrt-scaled merged bmm (deberta-v2 is
# left out: its padded query rows are fully masked with a finite fill, see the detection notes).
_EXTRA_SPECS: dict[str, tuple[str, str, dict]] = {
    "falcon": ("FalconConfig", "FalconModel", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                                   vocab_size=256)),
    "xglm": ("XGLMConfig", "XGLMModel", dict(num_layers=2, attention_heads=4, d_model=64, ffn_dim=128,
                                             vocab_size=256, max_position_embeddings=128)),
    "xlnet": ("XLNetConfig", "XLNetModel", dict(n_layer=2, n_head=4, d_model=64, d_inner=128, vocab_size=256)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeModel", dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256,
                                                                n_positions=128, multi_query=True,
                                                                bos_token_id=1, eos_token_id=2)),
    "swinv2": ("Swinv2Config", "Swinv2Model", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                                                   image_size=32, patch_size=2)),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                hidden_size=64, intermediate_size=128, vocab_size=256,
                                                max_position_embeddings=128)),
}  # fmt: skip
EXTRA_NAMES = tuple(_EXTRA_SPECS)
# transformers offers only eager attention for these extra architectures.
EXTRA_EAGER_ONLY = frozenset({"xglm", "xlnet", "swinv2"})


def _spec(name: str) -> tuple[str, str, dict]:
    if name in _SPECS:
        return _SPECS[name]
    if name in _EXTRA_SPECS:
        return _EXTRA_SPECS[name]
    raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(NAMES + EXTRA_NAMES)}")


def implementations(name: str) -> tuple[str, ...]:
    """The attention implementations transformers offers for zoo model ``name``."""
    return ("eager",) if name in EAGER_ONLY or name in EXTRA_EAGER_ONLY else ("eager", "sdpa")


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the attnopt zoo needs transformers: pip install 'attnopt[hf]'") from exc
    return transformers


def config(name: str, **overrides: Any):
    """The small config of zoo model ``name`` (overrides win)."""
    cfg_cls, _, base = _spec(name)
    return getattr(_transformers(), cfg_cls)(**{**base, **overrides})


def example_inputs(cfg, batch: int = 2, seq: int = 13, generator: torch.Generator | None = None) -> tuple[tuple, dict]:
    """Example ``(args, kwargs)`` for a model built from ``cfg``: token ids, pixels or audio features.

    Text models get ``input_ids`` and an ``attention_mask`` that pads the end of the last row, so the
    padding path is exercised; encoder-decoders also get ``decoder_input_ids``.
    """
    gen = generator or torch.Generator().manual_seed(0)
    mt = getattr(cfg, "model_type", "")
    if mt in ("vit", "clip_vision_model", "swin", "deit", "beit", "dinov2") or hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        channels = getattr(cfg, "num_channels", 3)
        return (torch.randn(batch, channels, size, size, generator=gen),), {}
    if mt == "whisper":
        frames = 2 * cfg.max_source_positions
        feats = torch.randn(batch, cfg.num_mel_bins, frames, generator=gen)
        dec = torch.randint(0, cfg.vocab_size, (batch, min(seq, cfg.max_target_positions)), generator=gen)
        return (), {"input_features": feats, "decoder_input_ids": dec}
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 3:] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if getattr(cfg, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(0, cfg.vocab_size, (batch, max(seq - 4, 1)), generator=gen)
    return (), kwargs


def build(name: str, attn_implementation: str = "eager", seed: int = 0, batch: int = 2, seq: int = 13,
          **overrides: Any) -> ZooModel:  # fmt: skip
    """Zoo model ``name`` with random weights (seeded), in eval mode, with its example inputs."""
    cfg = config(name, **overrides)
    _, model_cls, _ = _spec(name)
    torch.manual_seed(seed)
    model = getattr(_transformers(), model_cls)._from_config(cfg, attn_implementation=attn_implementation)
    model.eval()
    args, kwargs = example_inputs(cfg, batch=batch, seq=seq)
    return ZooModel(name, model, args, kwargs)


def builders() -> dict[str, Callable[..., ZooModel]]:
    return {name: (lambda n=name, **kw: build(n, **kw)) for name in NAMES}
