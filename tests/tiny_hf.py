"""Tiny random transformers models saved to a folder, as a reward loads them (no downloads).

Every model is built from a config under a fixed seed and saved with its processor; the CLIP
tokenizer is built in memory from a character-level byte-BPE vocabulary (no merges).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (openai/CLIP simple_tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_clip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok,
    )
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def save_tiny_owlv2(path: Path, image_size: int = 64, seed: int = 0) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok = clip_tokenizer()
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        projection_dim=32,  # OWL's class head needs it = the text width
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(cfg).eval()
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tok)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path
