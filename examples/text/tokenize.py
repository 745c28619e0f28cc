"""A byte-level tokenizer: what clients of the text encoder use (no vocabulary files)."""

from __future__ import annotations

from typing import Any

import numpy as np

VOCAB = 258  # 256 bytes + BOS + EOS
BOS, EOS = 256, 257
MAX_LEN = 128


def tokenize(text: str) -> np.ndarray[Any, np.dtype[np.int64]]:
    ids = [BOS, *text.encode("utf-8")[: MAX_LEN - 2], EOS]
    return np.asarray(ids, dtype=np.int64).reshape(1, -1)
