"""How far a variant of the model moves its outputs: the one measure behind sensitivity allocation, the unified
plan's structured options and `--drop-blocks`' choice.

    probe batches ─dense model─► reference outputs (once)
    probe batches ─variant─────► outputs ─► mean over outputs of: mean over samples of (1 − cosine) to the
                                            reference, or for a causal LM's logits the mean KL(dense ‖ variant)
                                            per next-token position (`stages.next_token`)

KL is what a language model's perplexity and agreement follow; cosine of logits is not (0.92 for a model whose
perplexity doubled). A classifier's logits ([batch, classes]) are scored by KL of the class distributions too.

A variant is a whole model (a structured cut applied) or a session of the error-injected model fed extra inputs
(`passes.inject_error`: one session serves many layers and ranks, run from where the errors act)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from lrdeploy.jobs import one_blas_thread
from lrdeploy.runtime.onnxruntime import create_session
from lrdeploy.stages.classes import ClassScores, is_class_logits
from lrdeploy.stages.next_token import NextTokenReference, is_next_token_output
from lrdeploy.stages.validate import per_sample_cosine


def degradation(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]],
                next_token: dict[int, list[NextTokenReference]], names: list[str]) -> float:
    """Mean over outputs of mean over samples of 1 − cosine; when an output (`names`, in order) is a causal LM's
    logits (`next_token`: its dense side per batch, by output index) or a classifier's logits, its mean KL alone (a
    decoder's KV-cache outputs, a classifier's hidden states are what the logits already answer for)."""
    losses, task_kl = [], []
    for index, (name, out_batches) in enumerate(zip(names, zip(*outputs))):
        if index in next_token:
            references = next_token[index]
            task_kl.append(sum(r.kl_sum(o) for r, o in zip(references, out_batches))
                           / sum(r.positions for r in references))
            continue
        ref_batches = [batch[index] for batch in reference]
        if all(is_class_logits(name, r) for r in ref_batches):
            classes = ClassScores()
            for r, o in zip(ref_batches, out_batches):
                classes.add(r, o)
            task_kl.append(classes.result().kl)  # a classifier is judged by its labels: KL, like an LM
            continue
        cosines = np.concatenate([per_sample_cosine(r, o) for r, o in zip(ref_batches, out_batches)])
        losses.append(1.0 - float(np.mean(cosines)))
    return float(np.mean(task_kl or losses))


def next_token_references(names: list[str], reference: list[list[np.ndarray]], feeds: list[dict[str, np.ndarray]],
                          mask_name: str | None) -> dict[int, list[NextTokenReference]]:
    """The dense side of KL per batch for each output that is a causal LM's logits over the fed input_ids (and
    has a position with a real next token)."""
    found = {}
    for index, name in enumerate(names):
        batches = [batch[index] for batch in reference]
        if all(is_next_token_output(name, r, feed) for r, feed in zip(batches, feeds)):
            references = [NextTokenReference(r, feed["input_ids"], feed.get(mask_name) if mask_name else None)
                          for r, feed in zip(batches, feeds)]
            if sum(r.positions for r in references):
                found[index] = references
    return found


class DistortionProbe:
    """The dense model's outputs on a few probe batches, computed once, and the distortion of variants against them
    (`mask_name`: the attention mask input, so that padding is not scored). `keep`: inner tensors of the dense
    model to keep per batch too (typed by `types`), read by the suffixes sensitivity runs (`passes.error_reach`)."""

    def __init__(self, model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], threads: int = 0,
                 mask_name: str | None = None, keep: Sequence[str] = (),
                 types: Mapping[str, onnx.TypeProto] | None = None):
        self.batches = list(batches)
        self.threads = threads
        self.mask_name = mask_name
        self.names = [output.name for output in model.graph.output]
        inner = [name for name in keep if name not in self.names]  # (a graph output that later nodes read too:
        with outputs_added(model, inner, types or {}):  # CLIP's text_embeds) — one session gives them all
            dense = create_session(model, threads)
        runs = [dict(zip(self.names + inner, dense.run(self.names + inner, feed))) for feed in self.batches]
        self.reference = [[values[name] for name in self.names] for values in runs]
        self.kept = [{name: values[name] for name in keep} for values in runs]
        self.next_token = next_token_references(self.names, self.reference, self.batches, mask_name)
        for batch in self.reference:  # a vocabulary-wide reference lives on as its distributions only
            for index in self.next_token:
                batch[index] = None

    def masks(self) -> list[np.ndarray | None]:
        """Each probe batch's attention mask (1 where a position is real), or None."""
        return [batch.get(self.mask_name) if self.mask_name else None for batch in self.batches]

    def of_session(self, session: ort.InferenceSession) -> float:
        """Distortion of a session's outputs."""
        return self.of_outputs([session.run(self.names, feed) for feed in self.batches])

    def of_outputs(self, outputs: list[list[np.ndarray]]) -> float:
        """Distortion of a variant's outputs (per batch, in the order of `names`); its dot products on one BLAS
        thread, as in a Ray task."""
        with one_blas_thread():
            return degradation(self.reference, outputs, self.next_token, self.names)

    def of_model(self, variant: onnx.ModelProto) -> float:
        """Distortion of a whole variant model."""
        return self.of_session(create_session(variant, self.threads))


@contextmanager
def outputs_added(model: onnx.ModelProto, names: Sequence[str], types: Mapping[str, onnx.TypeProto]) -> Iterator[None]:
    """`model` with `names` as extra graph outputs while inside (the caller's proto is restored: a copy of an LM
    would cost its size again)."""
    for name in names:
        value = model.graph.output.add(name=name)
        value.type.CopyFrom(types[name])
    try:
        yield
    finally:
        del model.graph.output[len(model.graph.output) - len(names):]
