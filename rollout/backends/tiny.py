"""Tiny random diffusers pipelines of each family, built from configs under a fixed seed.

For tests and benches: no download (tokenizers are built in memory from a character vocabulary),
every module in eval mode, the real pipeline classes and scheduler configs of each family (Flux-Dev's
dynamic shift and guidance embedding, SD3.5's static shift 3, SD1.5's PNDM config, SDXL's Euler).
The shapes follow diffusers' own ``get_dummy_components()`` tests. ``save_tiny(family, path)``
writes one as a pipeline directory that the backends load like a real model.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

FAMILIES = ("flux", "sd3", "sd15", "sdxl")
#: image size (pixels) of every tiny pipeline: 16 x 16 latents behind a 2x VAE
SIZE = 32

_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:  # one token per character, and the word-final form: no merges needed
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(with_projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=2 + 2 * len(_CHARS),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    )


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=4 + 2 * 26 + 10 + len(string.punctuation) + 26,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def _vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        **kw,
    )


def tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = _t5(32)
    torch.manual_seed(seed + 3)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    # FLUX.1-dev's scheduler config: resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return _eval(pipe)


def tiny_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(seed + 3)
    text_encoder_3 = _t5(64)
    torch.manual_seed(seed + 4)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's static shift
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    )
    return _eval(pipe)


# the UNet shape shared by the tiny SD1.5 and SDXL pipelines
_TINY_UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=SIZE // 2,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def tiny_sd15(seed: int = 0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(seed + 2)
    vae = _vae()
    # SD1.5 ships a PNDM config; the backend runs Euler on the same betas
    scheduler = PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _eval(pipe)


def tiny_sdxl(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=2,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(seed + 3)
    vae = _vae()
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _eval(pipe)


def tiny_pipeline(family: str, seed: int = 0):
    builders = {"flux": tiny_flux, "sd3": tiny_sd3, "sd15": tiny_sd15, "sdxl": tiny_sdxl}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return builders[family](seed)


def save_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline of ``family`` as a diffusers pipeline directory; returns the path."""
    path = Path(path)
    tiny_pipeline(family, seed).save_pretrained(path)
    return path


def _eval(pipe):
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
