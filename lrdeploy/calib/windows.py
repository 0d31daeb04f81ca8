"""Calibration and evaluation data from text, as a language model reads it: windows of N tokens.

    text files / Python's pydoc topics ─documents─► held-out documents │ calibration documents
        each side: tokens of its documents in order, an end-of-text token between two ─► windows of N tokens

Documents, not windows, are split between the two sides (by a seeded shuffle), so no held-out window shares a
document with a calibration window: the held-out figures measure text the build never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrdeploy.errors import CalibrationDataError, MissingDependencyError


def text_documents(paths: list[Path], pydoc: bool) -> list[str]:
    """Each text file is one document; with `pydoc`, each of Python's pydoc topics too (a fixed order)."""
    documents = []
    for path in paths:
        try:
            documents.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationDataError(f"cannot read text file {path} ({type(exc).__name__}: {exc}); give UTF-8 "
                                       "text files") from None
    if pydoc:
        from pydoc_data.topics import topics

        documents += [topics[key] for key in sorted(topics)]
    return [document for document in documents if document.strip()]


def _tokenizer(tokenizer_dir: Path):
    """The model's tokenizer and the token put between two documents (end of text, else the separator)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("tokenizing needs transformers; install lrdeploy's torch extra") from None
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return tokenizer, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _windows(token_lists: list[list[int]], separator: int | None, tokens: int) -> np.ndarray:
    stream: list[int] = []
    for ids in token_lists:
        if stream and separator is not None:
            stream.append(separator)
        stream += ids
    count = len(stream) // tokens
    return np.asarray(stream[: count * tokens], np.int64).reshape(count, tokens)


def window_inputs(windows: np.ndarray) -> dict[str, np.ndarray]:
    """A language model's inputs for token windows [n, tokens]: the ids and an all-ones attention mask."""
    return {"input_ids": windows, "attention_mask": np.ones_like(windows)}


def text_windows(documents: list[str], tokenizer_dir: Path, tokens: int, calib_windows: int, eval_windows: int,
                 seed: int = 0, rest: bool = False) -> tuple[dict[str, np.ndarray], ...]:
    """(calibration, evaluation) inputs: `input_ids` and an all-ones `attention_mask`, [windows, tokens] int64,
    from disjoint documents (the evaluation side is filled first, from a seeded shuffle of the documents). With
    `rest`, a third: every window of the calibration side past the calibration ones (text to train on that the
    evaluation never sees)."""
    tokenizer, separator = _tokenizer(tokenizer_dir)
    order = np.random.default_rng(seed).permutation(len(documents))
    encoded = [tokenizer(documents[i], add_special_tokens=False, verbose=False)["input_ids"] for i in order]
    held_out, cut = 0, 0
    while cut < len(encoded) and held_out < eval_windows * tokens:
        held_out += len(encoded[cut]) + 1
        cut += 1
    evaluation = _windows(encoded[:cut], separator, tokens)[:eval_windows]
    calibration_side = _windows(encoded[cut:], separator, tokens)
    calibration = calibration_side[:calib_windows]
    if len(evaluation) < eval_windows or len(calibration) < calib_windows:
        total = sum(len(ids) + 1 for ids in encoded) // tokens
        raise CalibrationDataError(
            f"{calib_windows} calibration + {eval_windows} evaluation windows of {tokens} tokens were asked for, but "
            f"the text gives about {total} ({len(calibration)} + {len(evaluation)} from separate documents); give "
            "more text (--text, --pydoc) or fewer or shorter windows")
    splits = (window_inputs(calibration), window_inputs(evaluation))
    return splits + (window_inputs(calibration_side[calib_windows:]),) if rest else splits


def document_windows(documents: list[str], tokenizer_dir: Path, tokens: int) -> dict[str, np.ndarray]:
    """Every window of `tokens` tokens of `documents` in order (an end-of-text token between two)."""
    tokenizer, separator = _tokenizer(tokenizer_dir)
    encoded = [tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"] for document in documents]
    return window_inputs(_windows(encoded, separator, tokens))
