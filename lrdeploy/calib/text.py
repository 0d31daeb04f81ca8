"""Real English text for calibration and evaluation: the prose shipped with Python in `pydoc_data.topics`,
split into sentences, and a tokenizer helper that turns them into model inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lrdeploy.errors import MissingDependencyError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def pydoc_sentences(min_words: int = 5, max_words: int = 80) -> list[str]:
    """Distinct prose sentences from Python's pydoc topics, in a fixed order (code and grammar left out)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    sentences = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if "::=" in paragraph or ">>>" in paragraph or not paragraph.rstrip().endswith((".", ":")):
                continue  # grammar rules and code samples are not prose
            text = " ".join(paragraph.replace("*", " ").split())
            for sentence in _SENTENCE_END.split(text):
                words = sentence.split()
                if min_words <= len(words) <= max_words and sentence not in seen and not set(sentence) & set("=|{}"):
                    seen.add(sentence)
                    sentences.append(sentence)
    return sentences


def tokenize(sentences: list[str], tokenizer_dir: Path, max_length: int = 128) -> dict[str, np.ndarray]:
    """input_ids and attention_mask (int64, padded to `max_length`) for a Hugging Face tokenizer folder."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("tokenizing needs transformers; install lrdeploy's demo extra") from None
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)}


def pydoc_split(calib_count: int, eval_count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences, drawn by a fixed shuffle of `pydoc_sentences()`."""
    sentences = pydoc_sentences()
    if calib_count + eval_count > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences available, {calib_count + eval_count} asked for")
    order = np.random.default_rng(seed).permutation(len(sentences))
    chosen = [sentences[i] for i in order[: calib_count + eval_count]]
    return chosen[:calib_count], chosen[calib_count:]
