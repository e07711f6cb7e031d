"""Prompts -> LlamaGen t2i caption features with a T5 encoder the user has on disk (``--t5-path``).

LlamaGen encodes captions with flan-t5-xl (hidden size 2048): the tokenizer pads every prompt to 120 tokens and
truncates longer ones, the encoder's last hidden state is the caption's features, and its attention mask says
which of the 120 positions hold tokens. The sampler then moves the caption's tokens to the end (left padding)
and zeroes the rest: :meth:`Captions.from_tokens` does the same here. Nothing is downloaded: the directory must
hold a transformers ``T5EncoderModel`` (or a full T5 checkpoint, whose encoder is used) and its tokenizer.

One deliberate difference: LlamaGen cleans prompts with DeepFloyd's ``clean_caption`` (ftfy, HTML stripping, URL
and punctuation rules) before tokenising; here a prompt is only lower-cased and stripped (its
``use_text_preprocessing=False`` path). For features identical to LlamaGen's on unusual text, extract them with
LlamaGen's ``language/extract_t5_feature.py`` and pass the ``.npy`` files with ``--caption-features``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mulosd.errors import MulosdError
from mulosd.models.condition import Captions


class T5Captioner:
    """A T5 encoder and its tokenizer loaded from ``path`` (local files only), on ``device`` in float32."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_dir():
            raise MulosdError(f"T5 path {path} is not a directory; --t5-path must name a local directory holding a "
                              "transformers T5 encoder (config.json, weights) and its tokenizer")
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise MulosdError("--prompt needs the transformers package for the T5 encoder: pip install "
                              "'mulosd[t5]' (or pass precomputed features with --caption-features)") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True,
                                                        torch_dtype=torch.float32).eval().to(device)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MulosdError(f"T5 path {path} does not hold a loadable T5 encoder and tokenizer: {first}") from None
        self.device = torch.device(device)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @torch.inference_mode()
    def encode(self, prompts: list[str], length: int, caption_dim: int) -> Captions:
        """Prompts -> Captions [len(prompts), length, caption_dim] in LlamaGen's layout (see the module doc)."""
        if self.hidden_size != caption_dim:
            raise MulosdError(f"the T5 encoder's hidden size is {self.hidden_size}; the model's caption projection "
                              f"takes {caption_dim} (LlamaGen's t2i models use flan-t5-xl, 2048)")
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise MulosdError("every prompt must be non-empty text")
        texts = [p.lower().strip() for p in prompts]
        batch = self.tokenizer(texts, max_length=length, padding="max_length", truncation=True,
                               return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask)["last_hidden_state"].float().cpu()
        counts = mask.sum(1).tolist()
        return Captions.cat([Captions.from_tokens(h[:n], length, f"prompt {i}") for i, (h, n) in
                             enumerate(zip(hidden, counts))])
