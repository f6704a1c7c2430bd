"""Build the untrained tiny FLUX pipeline (standard diffusers/transformers classes) from a seed.

Design: 48x48 RGB images, a 16-channel AutoencoderKL with 8x downsampling (6x6 latents, 3x3 = 9
packed image tokens of 64 channels, as FLUX: one token per cell of the world's 3x3 grid, so an
object is one token), a FLUX transformer with 2 double and 4 single blocks of width 128, a tiny
CLIP text model (learned, order-aware: its pooled EOS state carries word order) and a 2-layer T5
encoder, learned too: FLUX gives text tokens no position (txt_ids are zeros), so only T5's
relative-position attention can bind "red" to "circle" and tell "left of" which object comes first.
Text is always padded to world.TEXT_LENGTH = 16 tokens (bitflux passes max_sequence_length=16 for the toy).
Guidance: guidance_embeds=False; the model is trained with 10% empty prompts so real
classifier-free guidance works through FluxPipeline's `true_cfg_scale` + `negative_prompt=""`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .world import DEFAULT_WORLD, IMAGE_SIZE, World, vocabulary

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CLIP_MAX_LENGTH = 16  # FluxPipeline pads CLIP input to tokenizer.model_max_length
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of the tiny pipeline."""

    width_heads: int = 4  # attention heads
    head_dim: int = 32  # attention head dim (= sum of axes_dims_rope)
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 4  # single-stream blocks
    text_dim: int = 64  # CLIP hidden = T5 d_model
    t5_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)
    generic_words: bool = False  # vocabulary has "object(s)" (training on partial captions)


def _vocab(generic: bool = False, world: World = DEFAULT_WORLD) -> dict[str, int]:
    words = list(SPECIALS) + vocabulary(generic, world)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(kind: str, generic: bool = False, world: World = DEFAULT_WORLD) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary; `clip` adds <bos>..<eos>, `t5` adds </s>."""
    tok = Tokenizer(models.WordLevel(_vocab(generic, world), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)]
        )
        max_len = CLIP_MAX_LENGTH
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", EOS_ID)])
        max_len = 512
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_len,
        padding_side="right",
    )


def build_text_encoders(cfg: ToyConfig, seed: int, world: World = DEFAULT_WORLD) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Tiny CLIP and T5 (2 layers each, learned with the transformer)."""
    torch.manual_seed(seed + 1)
    n = len(_vocab(cfg.generic_words, world))
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n,
            hidden_size=cfg.text_dim,
            intermediate_size=cfg.text_dim * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            projection_dim=cfg.text_dim,
        )
    )
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=n,
            d_model=cfg.text_dim,
            d_kv=16,
            d_ff=cfg.text_dim * 2,
            num_layers=cfg.t5_layers,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    )
    return clip, t5


def build_vae(cfg: ToyConfig, seed: int) -> AutoencoderKL:
    """A small KL autoencoder: 3 -> LATENT_CHANNELS channels, downsampling 2**(len(channels)-1)."""
    torch.manual_seed(seed + 3)
    k = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * k,
        up_block_types=("UpDecoderBlock2D",) * k,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from data after VAE training
        shift_factor=0.0,
    )


def build_transformer(cfg: ToyConfig, seed: int) -> FluxTransformer2DModel:
    """The tiny FLUX transformer: both double- and single-stream blocks, no guidance embedding."""
    torch.manual_seed(seed + 4)
    r = cfg.head_dim // 4
    axes = (cfg.head_dim - 2 * (3 * r // 2 // 2 * 2), 3 * r // 2 // 2 * 2, 3 * r // 2 // 2 * 2)  # (8, 12, 12)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.width_heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.text_dim,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX's scheduler settings (dynamic resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_pipeline(seed: int = 0, cfg: ToyConfig | None = None, world: World = DEFAULT_WORLD) -> FluxPipeline:
    """The untrained pipeline for `world`'s vocabulary; every weight is a deterministic function of `seed`."""
    cfg = cfg or ToyConfig()
    clip, t5 = build_text_encoders(cfg, seed, world)
    return FluxPipeline(
        scheduler=build_scheduler(),
        vae=build_vae(cfg, seed),
        text_encoder=clip,
        tokenizer=build_tokenizer("clip", cfg.generic_words, world),
        text_encoder_2=t5,
        tokenizer_2=build_tokenizer("t5", cfg.generic_words, world),
        transformer=build_transformer(cfg, seed),
    )
