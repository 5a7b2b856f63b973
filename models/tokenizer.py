"""Caption tokenizer: a WordPiece tokenizer (`tokenizers`) over a vocabulary from the training captions.

The trained tokenizer (normaliser, truncation and padding included) is saved as `tokenizer.json`, travels
inside every checkpoint and bundle, and is the only tokenisation code path (training, eval and serving).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from cirflow.core.config import check_positive

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP]  # PAD first so that its id is 0
MIN_LENGTH = 3  # [CLS], one caption token, [SEP]


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 1000  # shapes captions use ~300 words; real datasets want more
    max_length: int = 32  # tokens including [CLS]/[SEP]; longer captions are truncated
    min_frequency: int = 1  # a word needs this many occurrences to enter the vocabulary whole

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "min_frequency")
        if self.max_length < MIN_LENGTH:
            raise ValueError(f"max_length={self.max_length} leaves no room for a caption: [CLS] and [SEP] "
                             f"take two tokens, so it must be at least {MIN_LENGTH}")


def train_tokenizer(captions: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Build a lower-casing WordPiece tokenizer that adds [CLS] ... [SEP], truncates and pads.

    The vocabulary is chosen here, not by `tokenizers`' WordPieceTrainer: that trainer orders (and on ties
    picks) tokens by hash-map iteration, so the same captions gave different vocabularies run to run.
    Ours: special tokens, every seen character as a word start and as a continuation ("##c"), so unseen
    words decompose instead of becoming [UNK], then whole words by frequency (ties alphabetical).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word})
    base = [*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]
    if config.vocab_size < len(base):
        raise ValueError(f"vocab_size={config.vocab_size} is below the {len(base)} special and character tokens")
    known = set(base)
    words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
             if n >= config.min_frequency and w not in known]
    tokens = base + words[: config.vocab_size - len(base)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary; this marks them special for decode
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, cls_id), (SEP, sep_id)]
    )
    tok.enable_truncation(max_length=config.max_length)
    tok.enable_padding(pad_id=tok.token_to_id(PAD), pad_token=PAD)  # pads to the longest in the batch
    return tok


def tokenizer_from_json(text: str) -> Tokenizer:
    return Tokenizer.from_str(text)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (token ids, attention mask), both (B, L) int64, padded to the longest text."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask
