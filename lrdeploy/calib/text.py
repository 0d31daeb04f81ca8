"""Real English text for calibration and evaluation: the prose shipped with Python in `pydoc_data.topics`,
split into sentences, and a tokenizer helper that turns them into model inputs."""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path
from typing import Iterable

import numpy as np

from lrdeploy.errors import CalibrationDataError, MissingDependencyError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _prose_sentences(paragraphs: Iterable[str], min_words: int, max_words: int) -> list[str]:
    """Distinct prose sentences of `paragraphs`, in order; code samples, grammar rules and paragraphs that do
    not end like prose are left out."""
    seen: set[str] = set()
    sentences = []
    for paragraph in paragraphs:
        if "::=" in paragraph or ">>>" in paragraph or not paragraph.rstrip().endswith((".", ":")):
            continue
        text = " ".join(paragraph.replace("*", " ").split())
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if min_words <= len(words) <= max_words and sentence not in seen and not set(sentence) & set("=|{}"):
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def pydoc_sentences(min_words: int = 5, max_words: int = 80) -> list[str]:
    """Distinct prose sentences from Python's pydoc topics, in a fixed order (code and grammar left out)."""
    from pydoc_data.topics import topics

    return _prose_sentences((p for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])),
                            min_words, max_words)


def docstring_documents() -> list[str]:
    """The docstrings of each module of Python's standard library (read with `ast`, nothing is imported), one
    document per file in a fixed order, paragraphs kept: unlabeled English for distillation. Tests and IDLE are
    left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or other encodings
        docstrings = [ast.get_docstring(node) or "" for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        documents.append("\n\n".join(d for d in docstrings if d.strip()))
    return [document for document in documents if document.strip()]


def docstring_sentences(min_words: int = 5, max_words: int = 80) -> list[str]:
    """Distinct prose sentences from the standard library's docstrings (`docstring_documents`), in a fixed order:
    ~12,000 sentences of unlabeled English for distillation, about ten times the pydoc prose."""
    paragraphs = [p for document in docstring_documents() for p in re.split(r"\n\s*\n", document)]
    return _prose_sentences(paragraphs, min_words, max_words)


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
        raise CalibrationDataError(
            f"{calib_count} calibration + {eval_count} evaluation sentences were asked for but pydoc has only "
            f"{len(sentences)}; lower --calib-sentences or --eval-sentences")
    order = np.random.default_rng(seed).permutation(len(sentences))
    chosen = [sentences[i] for i in order[: calib_count + eval_count]]
    return chosen[:calib_count], chosen[calib_count:]
