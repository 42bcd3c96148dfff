"""Tiny Stable Diffusion pipelines built from configs, for tests and benchmarks.

No diffusion weights exist offline, so components are built from configs with a fixed seed. The CLIP tokenizer
is built in memory with whole-word BPE tokens for a given word list, so each word is one token.

A randomly initialised text encoder has no semantics at all: the presence score of Semantic Surgery (a token-wise
cosine to the concept direction) is then noise that does not rank prompts that contain a concept above prompts
that do not. The tiny pipelines therefore use a *bag-of-words* CLIP text encoder: random word embeddings, no
position or special-token embeddings, and uniform causal attention, so that every position after the prompt's
words (CLIP's padding positions, which dominate the 77-token sequence) carries the normalised sum of the words
seen so far — the property of a trained CLIP that the presence score relies on. The UNet and VAE stay random.
"""

from __future__ import annotations

import os
from itertools import pairwise

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

WORDS = (
    "a photo of an the in on with and by style painting portrait person woman man cat dog house car red blue green "
    "beach mountain landscape city night starry sunflowers van gogh vincent monet nude naked topless wearing clothes "
    "castle wizard harry potter dragon forest river bird flowers"
).split()

SD15_UNET = dict(  # the UNet config of Stable Diffusion 1.5 (~860M parameters)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as CLIP's tokenizer does it: repeatedly merge the best-ranked adjacent pair."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, float("inf")), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == float("inf"):
            break
        pair = (symbols[i], symbols[i + 1])
        merged: list[str] = []
        j = 0
        while j < len(symbols):
            if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                merged.append(pair[0] + pair[1])
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def make_tokenizer(words: tuple[str, ...] | list[str] = WORDS) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer in which every word of ``words`` is a single token."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(ByteLevel.alphabet())
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # merges added now rank after every earlier word's, so earlier words stay whole
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    merges = sorted(ranks, key=ranks.__getitem__)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    split = [w for w in dict.fromkeys(words) if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise ValueError(f"tiny tokenizer does not keep these words whole: {split}")
    return tokenizer


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _text_config(tokenizer: CLIPTokenizer, **sizes: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=max(len(tokenizer), sizes.pop("vocab_size", 0)), max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **sizes)


def _bag_of_words(text_encoder: CLIPTextModel | CLIPTextModelWithProjection, tokenizer: CLIPTokenizer) -> None:
    """Set the encoder's weights so position j outputs (a normalisation of) the sum of the words up to j."""
    transformer = getattr(text_encoder, "text_model", text_encoder)  # WithProjection keeps the transformer inside
    with torch.no_grad():
        embeddings = transformer.embeddings
        embeddings.token_embedding.weight.normal_(0.0, 1.0)
        embeddings.token_embedding.weight[[tokenizer.bos_token_id, tokenizer.eos_token_id]] = 0.0
        embeddings.position_embedding.weight.zero_()
        for layer in transformer.encoder.layers:
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj):  # equal scores: a causal running mean
                projection.weight.zero_()
                projection.bias.zero_()
            for projection in (attention.v_proj, attention.out_proj):
                projection.weight.copy_(torch.eye(projection.weight.shape[0]))
                projection.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2)


def tiny_sd_pipeline(seed: int = 0, words: tuple[str, ...] | list[str] = WORDS) -> StableDiffusionPipeline:
    """An SD1.x-shaped pipeline (~3M parameters): 128-dim bag-of-words text embeddings, 8-dim attention heads."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=128, intermediate_size=128, num_attention_heads=4,
                                              num_hidden_layers=2, projection_dim=128)).eval()
    _bag_of_words(text_encoder, tokenizer)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                                attention_head_dim=8, norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=_tiny_vae().eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, words: tuple[str, ...] | list[str] = WORDS) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: two text encoders (64 + 64 dims), pooled text embeds and time ids as added cond."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words)
    sizes = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    text_encoder = CLIPTextModel(_text_config(tokenizer, **sizes)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, **sizes)).eval()
    for encoder in (text_encoder, text_encoder_2):
        _bag_of_words(encoder, tokenizer)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=128, norm_num_groups=1).eval()
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae().eval(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=make_tokenizer(words), unet=unet,
                                     scheduler=_scheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_sized_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A pipeline with Stable Diffusion 1.5's UNet, text encoder and VAE shapes, for timing.

    Random weights, with the bag-of-words text encoder so concept prompts are detected as with the tiny pipelines;
    the compute (dense matmuls of CLIP ViT-L's shapes) is the same whatever the weights are.
    """
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(WORDS)
    text_encoder = CLIPTextModel(_text_config(tokenizer, vocab_size=49408, **SD15_TEXT)).eval()
    _bag_of_words(text_encoder, tokenizer)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
