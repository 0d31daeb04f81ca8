"""Greedy generation with a decoder exported with its KV cache (Optimum's `text-generation-with-past` interface),
in a plain ONNX Runtime loop: how a user runs such a model, and how the demo shows dense and compressed text.

    prompt ─prefill (empty past)─► logits, present.* ─► next token ─decode (past = presents)─► … ─► tokens
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrdeploy.errors import ModelLoadError
from lrdeploy.runtime.onnxruntime import create_session

PAST, PRESENT = "past_key_values.", "present."


def greedy_tokens(model: Path, prompt: list[int], steps: int, threads: int = 0,
                  stop: int | None = None) -> tuple[list[int], np.ndarray]:
    """The prompt followed by `steps` greedily chosen tokens (fewer when `stop` is chosen), and the last-position
    logits of every step [steps, vocabulary]. Each step feeds the previous step's `present.N.*` back as
    `past_key_values.N.*`, with position ids counting on from the prompt."""
    session = create_session(Path(model), threads)
    inputs = {i.name: i.shape for i in session.get_inputs()}
    past_names = [name for name in inputs if name.startswith(PAST)]
    if not past_names or "input_ids" not in inputs:
        raise ModelLoadError(f"{model} takes no KV cache (past_key_values.* inputs); export it with "
                             "`lrdeploy export --hf DIR --task text-generation-with-past`")
    outputs = [o.name for o in session.get_outputs()]
    past = {name: np.zeros((1, inputs[name][1], 0, inputs[name][3]), np.float32) for name in past_names}
    ids, tokens, seen = np.asarray([prompt], np.int64), list(prompt), []
    for _ in range(steps):
        length = len(tokens)
        feed = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64), **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(length - ids.shape[1], length, dtype=np.int64)[None]
        values = dict(zip(outputs, session.run(outputs, feed)))
        last = values["logits"][0, -1]
        seen.append(last)
        tokens.append(int(last.argmax()))
        past = {name: values[PRESENT + name[len(PAST):]] for name in past_names}
        ids = np.asarray([[tokens[-1]]], np.int64)
        if stop is not None and tokens[-1] == stop:
            break
    return tokens, np.stack(seen)
