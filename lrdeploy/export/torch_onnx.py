"""PyTorch → ONNX, ready for `lrdeploy build`.

Two sources:
- a local Hugging Face / sentence-transformers folder (`--hf DIR`): the encoder, with mean or CLS pooling
  and L2 normalisation inside the graph so that the output is the sentence embedding (`--task
  feature-extraction`), or a causal LM's logits over its vocabulary (`--task text-generation`), with its KV
  cache as inputs and outputs named as Optimum names them (`--task text-generation-with-past`);
- a factory (`--factory package.module:function`) returning (module, {input name: example tensor}).

Graphs get dynamic batch (axis 0) and sequence (axis 1 of rank-2 and rank-3 inputs) axes, opset 17,
weights as initializers and the given input/output names. After export the graph is run in ONNX Runtime
beside PyTorch on the example inputs and the max abs difference is checked against a tolerance.
torch and transformers are imported lazily (`pip install torch==2.13.0`, then the `torch` extra).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrdeploy.errors import ExportError, MissingDependencyError

OPSET = 17
POOLINGS = ("mean", "cls", "none")
TASKS = ("feature-extraction", "text-generation", "text-generation-with-past", "text-classification",
         "image-classification")  # Optimum's task names: a sentence embedder, a causal LM's logits (and the same with
# its KV cache as inputs and outputs, for a generation loop), a sequence classifier's and an image classifier's logits
CAUSAL_LM_TASKS = ("text-generation", "text-generation-with-past")


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    input_names: list[str]
    output_names: list[str]


def require_torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            "exporting needs PyTorch; run `pip install torch==2.13.0` then `pip install lrdeploy[torch]`"
        ) from None
    return torch


def _load_hf(model_dir: Path, auto_class: str, reads: str | tuple[str, ...] = "input_ids"):
    """The Hugging Face model in `model_dir`, loaded by transformers' `auto_class` with eager attention (traceable);
    it must read `reads` (token ids, or an image classifier's pixel values)."""
    require_torch()
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("exporting --hf models needs transformers; `pip install lrdeploy[torch]`") from None
    if not (Path(model_dir) / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json); pass the folder "
                          "that holds config.json and the weights")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = getattr(transformers, auto_class).from_pretrained(str(model_dir), attn_implementation="eager").eval()
    except Exception as exc:  # noqa: BLE001 — malformed config, missing or truncated weights: all the folder's fault
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ExportError(f"cannot load the Hugging Face model in {model_dir} ({type(exc).__name__}: "
                          f"{first[:200]}); check its config.json and that its weights (model.safetensors or "
                          "pytorch_model.bin) are complete") from None
    if getattr(model, "main_input_name", "input_ids") not in ((reads,) if isinstance(reads, str) else reads):
        accepted = " or ".join(repr(name) for name in ((reads,) if isinstance(reads, str) else reads))
        raise ExportError(f"{model_dir} holds a {type(model).__name__}, which reads {model.main_input_name!r}, not "
                          f"{accepted} as this --task needs: text and causal LMs read token ids, image classifiers "
                          "pixel values, and --task feature-extraction takes text, image and audio encoders; pick "
                          "the task of the model, or export it with Hugging Face Optimum (optimum-cli export onnx "
                          "--model DIR OUT) and build that ONNX file")
    return model


def _example_text_inputs(vocabulary: int, seq_len: int) -> dict:
    """Two samples of token ids every vocabulary has (small test models too), the second right-padded, so that
    masking is checked with a real mask."""
    torch = require_torch()
    generator = torch.Generator().manual_seed(0)
    high = min(2000, vocabulary) if vocabulary else 2000
    ids = torch.randint(min(1000, high // 2), high, (2, seq_len), generator=generator)
    mask = torch.ones((2, seq_len), dtype=torch.int64)
    mask[1, seq_len // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def causal_lm(model_dir: Path, seq_len: int = 16):
    """(module, example inputs) for the Hugging Face causal LM in `model_dir`: input_ids, attention_mask → logits
    over the vocabulary at every position, no KV cache (prefill; what `build` calibrates and validates)."""
    return logits_module(_load_hf(model_dir, "AutoModelForCausalLM"), seq_len)


def logits_module(model, seq_len: int = 16):
    """(module, example inputs) of `causal_lm` for a loaded Hugging Face causal LM (`model`, kept as `.model`)."""
    torch = require_torch()
    model.config.use_cache = False

    class CausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return CausalLM().eval(), _example_text_inputs(int(getattr(model.config, "vocab_size", 0) or 0), seq_len)


def causal_lm_with_past(model_dir: Path, past: int = 3, new: int = 2):
    """(module, example inputs, dynamic axes) for the causal LM in `model_dir` with its KV cache as tensors, named
    as Optimum's `text-generation-with-past` export names them: input_ids, attention_mask (past and new tokens),
    position_ids, past_key_values.N.key / .value [batch, kv heads, past, head size] → logits, present.N.key /
    .value. A generation loop feeds each step's presents back as the next step's past; an empty past (length 0)
    is a prefill."""
    return with_past_module(_load_hf(model_dir, "AutoModelForCausalLM"), past, new)


def with_past_module(model, past: int = 3, new: int = 2):
    """(module, example inputs, dynamic axes) of `causal_lm_with_past` for a loaded Hugging Face causal LM."""
    torch = require_torch()
    from transformers import DynamicCache

    config = model.config
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class CausalLMWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=config)
            for layer in range(layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{cache_argument: cache})
            presents = {}
            for layer, cached in enumerate(out.past_key_values.layers):
                presents[f"present.{layer}.key"], presents[f"present.{layer}.value"] = cached.keys, cached.values
            return {"logits": out.logits, **presents}

    inputs = _example_text_inputs(int(getattr(config, "vocab_size", 0) or 0), new)
    batch = inputs["input_ids"].shape[0]
    inputs["attention_mask"] = torch.ones((batch, past + new), dtype=torch.int64)
    inputs["position_ids"] = torch.arange(past, past + new).repeat(batch, 1)
    generator = torch.Generator().manual_seed(1)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for layer in range(layers):
        for part in ("key", "value"):
            inputs[f"past_key_values.{layer}.{part}"] = torch.randn(batch, kv_heads, past, head_dim, generator=generator)
            axes[f"past_key_values.{layer}.{part}"] = {0: "batch", 2: "past_sequence"}
            axes[f"present.{layer}.{part}"] = {0: "batch", 2: "total_sequence"}
    return CausalLMWithPast().eval(), inputs, axes


def sentence_embedder(model_dir: Path, pooling: str = "mean", normalize: bool = True, seq_len: int = 16,
                      model=None):
    """(module, example inputs) for the Hugging Face text encoder in `model_dir` (or `model`, loaded from it) with
    pooling in the graph; an encoder-decoder (T5) embeds with its encoder."""
    torch = require_torch()
    if pooling not in POOLINGS:
        raise ExportError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    encoder = model if model is not None else _load_hf(model_dir, "AutoModel")
    if getattr(encoder.config, "is_encoder_decoder", False):
        encoder = encoder.get_encoder()
    vocabulary = int(getattr(encoder.config, "vocab_size", 0) or 0)

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if pooling == "none":
                return hidden
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled

    return SentenceEmbedder().eval(), _example_text_inputs(vocabulary, seq_len)


def load_factory(spec: str):
    """Call `package.module:function` and check it returns (module, {input name: example tensor})."""
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ExportError(f"{spec!r} is not a factory; write it as package.module:function")
    try:
        produced = getattr(importlib.import_module(module_name), function)()
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"cannot load factory {spec!r} ({exc}); check the module path and function name") from None
    if not (isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[1], dict) and produced[1]):
        raise ExportError(f"factory {spec!r} must return (module, {{input name: example tensor}})")
    return produced


def _outputs(output) -> list:
    if isinstance(output, dict):
        return list(output.values())
    if isinstance(output, (tuple, list)):
        return list(output)
    return [output]


def _call(module, example_inputs: dict, positional: bool):
    """The module's output on the example inputs, passed by name or, with `positional`, in the dict's order."""
    torch = require_torch()
    with torch.no_grad():
        return module(*example_inputs.values()) if positional else module(**example_inputs)


def _output_names(module, example_inputs: dict, default: str, positional: bool = False) -> list[str]:
    output = _call(module, example_inputs, positional)
    if isinstance(output, dict):
        return list(output)
    count = len(_outputs(output))
    return [default] if count == 1 else [f"{default}_{i}" for i in range(count)]


def _dynamic_axes(example_inputs: dict, output_names: list[str], output_ranks: list[int]) -> dict:
    axes = {}
    for name, tensor in example_inputs.items():
        axes[name] = {0: "batch", 1: "sequence"} if tensor.dim() in (2, 3) else ({0: "batch"} if tensor.dim() else {})
    for name, rank in zip(output_names, output_ranks):
        axes[name] = {0: "batch", 1: "sequence"} if rank >= 3 else ({0: "batch"} if rank else {})
    return axes


def export_module(module, example_inputs: dict, output: Path, output_name: str = "output",
                  tolerance: float = 1e-4, retie: bool = False, positional: bool = False,
                  dynamic_axes: dict | None = None) -> ExportResult:
    """Export `module(**example_inputs)` to `output` (atomically) and check ONNX Runtime parity: the max abs
    difference within `tolerance` × the outputs' largest magnitude (at least 1), so that logits in the tens
    are held to the same float32 precision as unit embeddings. `retie`: an LM head tied to the embedding reads
    the table again instead of the transposed copy the exporter folds it into (`passes.tie_weights`).
    `positional`: the module takes the inputs in `example_inputs`' order (a variable number of them, e.g. a KV
    cache per layer); `dynamic_axes`: the module's own (default: batch and sequence on every input and output)."""
    torch = require_torch()
    from lrdeploy.files import atomic_path
    from lrdeploy.runtime.onnxruntime import create_session

    module = module.eval()
    output = Path(output)
    output_names = _output_names(module, example_inputs, output_name, positional)
    expected = [t.detach().float().numpy() for t in _outputs(_call(module, example_inputs, positional))]
    input_names = list(example_inputs)
    with atomic_path(output) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about Python control flow; parity is checked below
        try:
            torch.onnx.export(
                module, tuple(example_inputs.values()) if positional else (), str(tmp),
                kwargs=None if positional else dict(example_inputs), dynamo=False, opset_version=OPSET,
                input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes or _dynamic_axes(example_inputs, output_names, [e.ndim for e in expected]),
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              "make the module traceable or export it yourself") from None
        if retie:
            _retie(tmp)
        session = create_session(tmp)
        feed = {name: t.numpy() for name, t in example_inputs.items()}
        actual = session.run(output_names, feed)
        diff = max(float(np.max(np.abs(a.astype(np.float64) - e))) for a, e in zip(actual, expected))
        scale = max(1.0, *(float(np.max(np.abs(e))) for e in expected if e.size))
        if diff > tolerance * scale:
            raise ExportError(f"ONNX Runtime differs from PyTorch by {diff:.3g} (max abs; outputs reach {scale:.3g}) on "
                              f"the example inputs, above --tolerance {tolerance:g} of the outputs' largest magnitude; "
                              "check the model or raise --tolerance")
    return ExportResult(output, diff, input_names, output_names)


def _retie(path: Path) -> None:
    """Rewrite the exported file with its tied LM head reading the embedding table (one copy of the weight)."""
    import onnx
    import onnx_graphsurgeon as gs

    from lrdeploy.onnx_io import save_model
    from lrdeploy.passes.tie_weights import retie_transposed_copies

    graph = gs.import_onnx(onnx.load(str(path)))
    if retie_transposed_copies(graph).changed:
        save_model(gs.export_onnx(graph), path)


def export_hf(model_dir: Path, output: Path, pooling: str = "mean", normalize: bool = True,
              tolerance: float = 1e-4, task: str = "feature-extraction") -> ExportResult:
    """Export the folder for `task` (one of TASKS): a sentence embedder, a causal LM's logits, or a classifier's."""
    if task not in TASKS:
        raise ExportError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    if task in CAUSAL_LM_TASKS:
        return export_causal_lm(_load_hf(model_dir, "AutoModelForCausalLM"), output, task, tolerance)
    if task in ("text-classification", "image-classification"):
        module, inputs, axes = classifier(model_dir, task)
        return export_module(module, inputs, output, "logits", tolerance, positional=True, dynamic_axes=axes)
    name = "last_hidden_state" if pooling == "none" else "embedding"
    model = _load_hf(model_dir, "AutoModel", ("input_ids",) + SIGNAL_INPUTS)
    if model.main_input_name in SIGNAL_INPUTS:
        module, inputs = signal_encoder(model, pooling, normalize)
        axes = {next(iter(inputs)): {0: "batch"}, name: {0: "batch"}}
        return export_module(module, inputs, output, name, tolerance, positional=True, dynamic_axes=axes)
    module, inputs = sentence_embedder(model_dir, pooling, normalize, model=model)
    return export_module(module, inputs, output, name, tolerance)


SIGNAL_INPUTS = ("pixel_values", "input_features", "input_values")  # image and audio encoders' inputs


def signal_encoder(model, pooling: str = "mean", normalize: bool = True):
    """(module, example inputs) for an image or audio encoder (ViT, CLIP's vision model, Swin; Whisper's encoder,
    wav2vec2): its hidden states pooled over patches or frames (mean, the first token, or none), of the model's
    own input size (only the batch varies). An encoder-decoder (Whisper) exports its encoder."""
    torch = require_torch()
    if pooling not in POOLINGS:
        raise ExportError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    config, name = model.config, model.main_input_name
    encoder = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    generator = torch.Generator().manual_seed(0)
    if name == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else max(dict(config.image_size).values())
        example = torch.randn(2, int(getattr(config, "num_channels", 3)), size, size, generator=generator)
    elif name == "input_features":  # Whisper: log-mel frames, twice the encoder's positions
        example = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
    else:  # raw audio samples
        example = torch.randn(2, 16000, generator=generator)

    class SignalEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, signal):
            hidden = self.encoder(**{name: signal}).last_hidden_state
            if pooling == "none":
                return hidden
            pooled = hidden[:, 0] if pooling == "cls" else hidden.mean(1)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled

    return SignalEncoder().eval(), {name: example}


def classifier(model_dir: Path, task: str, seq_len: int = 16):
    """(module, example inputs, dynamic axes) for a fine-tuned classifier: text-classification (input_ids,
    attention_mask → logits [batch, labels]) or image-classification (pixel_values [batch, channels, size, size] →
    logits; the image size is the model's, only the batch varies)."""
    torch = require_torch()
    image = task == "image-classification"
    model = _load_hf(model_dir, "AutoModelForImageClassification" if image else "AutoModelForSequenceClassification",
                     "pixel_values" if image else "input_ids")
    config = model.config

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            names = ("pixel_values",) if image else ("input_ids", "attention_mask")
            return self.model(**dict(zip(names, inputs))).logits

    if not image:
        inputs = _example_text_inputs(int(getattr(config, "vocab_size", 0) or 0), seq_len)
        return Classifier().eval(), inputs, None
    size = config.image_size if isinstance(config.image_size, int) else max(dict(config.image_size).values())
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, int(getattr(config, "num_channels", 3)), size, size, generator=generator)
    return Classifier().eval(), {"pixel_values": pixels}, {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}


def export_causal_lm(model, output: Path, task: str, tolerance: float = 1e-4) -> ExportResult:
    """Export a loaded Hugging Face causal LM (a teacher, or a student made from a plan) for `task`
    ("text-generation": logits only; "text-generation-with-past": Optimum's KV-cache interface), its LM head
    tied to the embedding where the model ties them."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if task == "text-generation":
        module, inputs = logits_module(model)
        return export_module(module, inputs, output, "logits", tolerance, retie=tied)
    module, inputs, axes = with_past_module(model)
    return export_module(module, inputs, output, "logits", tolerance, retie=tied, positional=True, dynamic_axes=axes)


def export_factory(spec: str, output: Path, tolerance: float = 1e-4) -> ExportResult:
    module, inputs = load_factory(spec)
    return export_module(module, inputs, output, "output", tolerance)
