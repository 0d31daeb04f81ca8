"""The report model: the dataclass tree of a build (report.json, a stable schema) and of a sweep (sweep.json).

report.json schema (all keys always present):
    lrdeploy_version, input_model, output_model, external_data,
    config {rank_budget, method, allocation, rank_multiple, calib_samples, calib_source, eval_source, refit,
            optimize, ffn_keep, heads_keep, drop_blocks, qkv, values_keep},
    layers [{name, pattern, d_in, d_out, rank|null, params_before, params_after, status, reason,
             predicted_speedup|null, measured_speedup|null}],
    params {linear_before, linear_after, linear_ratio, model_before, model_after, model_ratio},
    accuracy {samples, passed, atol, rtol, neighbours,
              outputs {NAME: {cosine_mean, cosine_p5, rel_l2, max_abs, topk_agreement|null,
                              next_token {positions, ppl_dense, ppl, ppl_ratio,
                                          top1_agreement, kl} | null   (a causal LM's logits),
                              classes {samples, top1_agreement, kl} | null   (a classifier's logits)}}},
    timings {stage: seconds}, peak_rss_mb {stage: the process's peak resident MiB at the stage's end},
    warnings [str], bench (see bench.json) | null,
    spectra {layer: {weight: [σ² descending], feature: [output eigenvalues descending]}},
    finetune {steps, lr, hidden_weight, freeze_embeddings, train_samples, metric ("cosine" | "kl": next-token
              KL of a causal LM), initial, best, best_step, history [{step, check, train_loss?}]} | null
              (label-free distillation, `lrdeploy distill`; initial/best/check: the metric on the check split),
    generated [{prompt, dense, compressed}]   (greedy continuations of a causal LM by both models: the demo),
    fused_ops {dense: {op: count}, compressed: {op: count}}   (ONNX Runtime fused ops, e.g. Attention; equal
              counts mean compression kept every fusion),
    latency_plan {source (measured, or a profile; "seed" when not measured by lrdeploy), tokens, objective,
                  predicted_linear_ratio (linear layers' time under the plan / dense), note, kept_dense [layer]}
                 | (--plan unified / --target-latency) {plan, resource ("latency" | "params"), predicted_ratio, scope,
                  tokens, source, target_latency, predicted_distortion, choices [str], measured_ratio (median
                  time over dense's, measured here) | null, attempts [{planned_for, predicted, measured (worst
                  of by_tokens), by_tokens {tokens: ratio}, distortion}]}
                 | null
Parameters count weights only (biases excluded), so linear_ratio is what --rank-budget bounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lrdeploy.bench.measure import BenchResult
from lrdeploy.report.plan_records import LatencyPlanRecord


@dataclass
class LayerRecord:
    name: str
    pattern: str
    d_in: int
    d_out: int
    rank: int | None
    params_before: int
    params_after: int
    status: str  # "factorized" | "narrowed" | "dropped" | "dense" | "skipped"
    reason: str
    predicted_speedup: float | None = None  # dense FLOPs / split FLOPs
    measured_speedup: float | None = None  # dense time / split time (with --latency-aware)


@dataclass
class ParamSummary:
    linear_before: int
    linear_after: int
    linear_ratio: float
    model_before: int
    model_after: int
    model_ratio: float


@dataclass(kw_only=True)
class NextTokenAccuracy:
    """A causal LM's figures on held-out windows (`stages.next_token`): what a user judges a language model by."""

    HEADERS = ("perplexity dense", "perplexity", "ratio", "top-1 agreement", "KL (nats)")

    positions: int  # scored positions (a real token and a real next token)
    ppl_dense: float
    ppl: float  # perplexity of the compressed model
    ppl_ratio: float  # compressed / dense
    top1_agreement: float  # fraction of positions where both models' most likely next token is the same
    kl: float  # mean KL(dense ‖ compressed) in nats per position

    def cells(self) -> list[str]:
        """The figures as report cells, in HEADERS' order."""
        return [f"{self.ppl_dense:.3f}", f"{self.ppl:.3f}", f"×{self.ppl_ratio:.3f}",
                f"{self.top1_agreement:.3f}", f"{self.kl:.4f}"]


@dataclass(kw_only=True)
class ClassAccuracy:
    """A classifier's figures on held-out samples (`stages.classes`): the label it gives, and how far its class
    distribution moved."""

    HEADERS = ("top-1 agreement", "KL (nats)")

    samples: int
    top1_agreement: float  # fraction of samples where both models' most likely class is the same
    kl: float  # mean KL(dense ‖ compressed) of the class distributions, nats per sample

    def cells(self) -> list[str]:
        return [f"{self.top1_agreement:.3f}", f"{self.kl:.4f}"]


@dataclass
class OutputAccuracy:
    cosine_mean: float
    cosine_p5: float
    rel_l2: float
    max_abs: float
    topk_agreement: float | None = None  # per-sample vector outputs: nearest-neighbour agreement
    next_token: NextTokenAccuracy | None = None  # a causal LM's logits: perplexity, top-1 agreement, KL
    classes: ClassAccuracy | None = None  # a classifier's logits: top-1 agreement, KL


@dataclass
class AccuracyReport:
    samples: int
    passed: bool
    atol: float
    rtol: float
    outputs: dict[str, OutputAccuracy]
    neighbours: int = 10

    def language_model(self) -> tuple[str, NextTokenAccuracy] | None:
        """(output name, figures) of the first output scored as a causal LM's logits, if any: the task's metric,
        which reports show before cosine."""
        return next(((name, o.next_token) for name, o in self.outputs.items() if o.next_token is not None), None)

    def classifier(self) -> tuple[str, ClassAccuracy] | None:
        """(output name, figures) of the first output scored as a classifier's logits, if any."""
        return next(((name, o.classes) for name, o in self.outputs.items() if o.classes is not None), None)

    def task_table(self) -> tuple[str, tuple[str, ...], list[str]] | None:
        """(title, headers, cells) of the task's figures, which reports show first: a language model's next-token
        figures, or a classifier's top-1 agreement and KL; None for other models (cosine is their figure)."""
        if self.language_model() is not None:
            name, lm = self.language_model()
            return f"Next-token figures of {name!r} on {lm.positions:,} held-out positions", lm.HEADERS, lm.cells()
        if self.classifier() is not None:
            name, classes = self.classifier()
            return f"Classifier figures of {name!r} on {classes.samples:,} held-out samples", classes.HEADERS, \
                classes.cells()
        return None


@dataclass(kw_only=True)
class BuildConfigRecord:
    rank_budget: float
    method: str
    allocation: str
    rank_multiple: int
    calib_samples: int
    calib_source: str
    eval_source: str
    refit: bool = False
    optimize: str = "none"  # "ort": compressed inside ONNX Runtime's fused graph
    ffn_keep: float | None = None  # FFN blocks narrowed to this fraction of their neurons
    heads_keep: float | None = None  # attention blocks cut to this fraction of their heads
    drop_blocks: int = 0  # whole transformer blocks dropped
    qkv: str = "separate"  # "joint": one low-rank basis per self-attention's Q, K and V
    values_keep: float | None = None  # every head's value/output width narrowed to this fraction of its head size


@dataclass
class FinetuneRecord:
    """How the factors were fine-tuned by label-free distillation (`lrdeploy distill`): the training and the check
    split's `metric` (cosine to the teacher, or next-token KL for a causal LM) before, at the kept checkpoint
    (`best`, at `best_step`) and along the way (`history` [{step, check, train_loss?}])."""

    steps: int
    lr: float
    hidden_weight: float
    freeze_embeddings: bool
    train_samples: int
    metric: str = "cosine"
    initial: float = 1.0
    best: float = 1.0
    best_step: int = 0
    history: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One sentence for the console and the reports."""
        what = "next-token KL (nats)" if self.metric == "kl" else "cosine to the original"
        return (f"{self.steps} distillation steps on {self.train_samples} unlabeled samples, lr {self.lr:g}, "
                f"hidden-state weight {self.hidden_weight:g}; {what} on the check split {self.initial:.4f} → "
                f"{self.best:.4f} (best at step {self.best_step})")


@dataclass
class GeneratedText:
    """A prompt and each model's greedy continuation of it (a causal LM with its KV cache, ONNX Runtime)."""

    prompt: str
    dense: str
    compressed: str


@dataclass
class BuildReport:
    lrdeploy_version: str
    input_model: str
    output_model: str
    external_data: bool
    config: BuildConfigRecord
    layers: list[LayerRecord]
    params: ParamSummary
    accuracy: AccuracyReport | None
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # the process's peak resident MiB at each stage's end
    warnings: list[str] = field(default_factory=list)
    bench: BenchResult | None = None  # dense vs compressed (with --bench); report.json keeps bench.json's keys
    spectra: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # {layer: {weight, feature}}
    finetune: FinetuneRecord | None = None  # when the factors were fine-tuned by distillation
    fused_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # {"dense"|"compressed": {op: count}}
    latency_plan: LatencyPlanRecord | None = None  # see the schema above
    generated: list[GeneratedText] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepPoint:
    """One budget of a sweep: its size, accuracy on the chosen output (next-token figures for a causal LM's logits)
    and (optionally) latency ratio."""

    budget: float
    linear_ratio: float
    model_ratio: float
    cosine_mean: float
    cosine_p5: float
    topk_agreement: float | None
    latency_ratio: float | None
    output_model: str | None
    ppl_ratio: float | None = None
    top1_agreement: float | None = None
    kl: float | None = None

    @classmethod
    def from_report(cls, budget: float, report: BuildReport, output: str, latency_ratio: float | None) -> "SweepPoint":
        """The point of one budget's build, read from its report (accuracy of `output`)."""
        params, accuracy = report.params, report.accuracy.outputs[output]
        lm, task = accuracy.next_token, accuracy.next_token or accuracy.classes  # top-1 and KL: an LM's or a classifier's
        return cls(budget, params.linear_ratio, params.model_ratio, accuracy.cosine_mean, accuracy.cosine_p5,
                   accuracy.topk_agreement, latency_ratio, report.output_model,
                   lm.ppl_ratio if lm else None, task.top1_agreement if task else None, task.kl if task else None)


LOWER_IS_BETTER = ("ppl_ratio", "kl")  # sweep metrics whose target is a ceiling; on the others a floor


def target_sign(metric: str) -> str:
    """How a target on `metric` is met: "≤" for perplexity ratio and KL, "≥" for the rest."""
    return "≤" if metric in LOWER_IS_BETTER else "≥"


def sweep_table(points: list[SweepPoint]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a sweep's per-budget table, shared by the console, sweep.md and report.html: the
    next-token figures when the output is a causal LM's logits, else top-k agreement."""
    fmt = lambda v, d=4: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    language_model = any(p.ppl_ratio is not None for p in points)
    classifier = not language_model and any(p.top1_agreement is not None for p in points)
    task = (["perplexity ratio", "top-1 agreement", "KL"] if language_model else
            ["top-1 agreement", "KL"] if classifier else ["top-k agreement"])
    headers = ["ρ", "linear kept", "model kept", "cosine mean", "cosine p5", *task, "latency ratio", "model"]
    rows = [[f"{p.budget:.3f}", fmt(p.linear_ratio, 3), fmt(p.model_ratio, 3), fmt(p.cosine_mean), fmt(p.cosine_p5),
             *([fmt(p.ppl_ratio, 3), fmt(p.top1_agreement, 3), fmt(p.kl)] if language_model else
               [fmt(p.top1_agreement, 3), fmt(p.kl)] if classifier else [fmt(p.topk_agreement, 3)]),
             fmt(p.latency_ratio, 3), p.output_model or "(not kept)"] for p in points]
    return headers, rows


@dataclass
class SweepReport:
    """sweep.json: every budget built (or probed by bisection toward `target` on `metric`), and the one chosen."""

    model: str
    output: str
    metric: str
    target: float | None
    chosen: float | None
    points: list[SweepPoint] = field(default_factory=list)
