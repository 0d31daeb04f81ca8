"""Export a Hugging Face sentence embedder (e.g. all-MiniLM-L6-v2) to ONNX with pooling inside the graph.

    input_ids, attention_mask ─► encoder ─► last_hidden_state ─mean pool (mask)─► L2 normalize ─► embedding

Dynamic batch and sequence axes, opset 17, weights as initializers. torch and transformers are imported
lazily (install the `demo` extra, after `pip install torch==2.13.0`).
"""

from __future__ import annotations

from pathlib import Path

from lrdeploy.errors import MissingDependencyError

OPSET = 17


def _require_torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "exporting needs torch and transformers; run `pip install torch==2.13.0` then `pip install -e .[demo]`"
        ) from None
    return torch, transformers


def export_sentence_embedder(model_dir: Path, output: Path, pooling: str = "mean", normalize: bool = True,
                             seq_len: int = 128) -> Path:
    """Write `output` (ONNX) for the Hugging Face encoder in `model_dir`; returns `output`."""
    torch, transformers = _require_torch()
    from lrdeploy.files import atomic_path

    encoder = transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled

    ids = torch.ones((2, seq_len), dtype=torch.int64)
    mask = torch.ones((2, seq_len), dtype=torch.int64)
    output = Path(output)
    with atomic_path(output) as tmp, torch.no_grad():
        torch.onnx.export(
            SentenceEmbedder().eval(), (ids, mask), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "embedding": {0: "batch"}},
        )
    return output
