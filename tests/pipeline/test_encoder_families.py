"""Head cuts on the encoders whose attention differs from BERT's, exported by torch's legacy and dynamo
exporters: T5 (no biases, a relative position bias computed in the first block from a [buckets, H] table and
added to every block's scores) and Whisper's encoder (Q scaled by 1/√h_d before its heads are split). Exact where
the removed heads write nothing (their rows of each output projection zeroed in PyTorch before export)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

from lrdeploy.cli import main  # noqa: E402
from tests.conftest import run_model  # noqa: E402

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16


class Hidden(torch.nn.Module):
    def __init__(self, model, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, inputs):
        return self.model(**{self.name: inputs}).last_hidden_state


def t5_encoder():
    config = transformers.T5Config(vocab_size=256, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=128, num_layers=2,
                                   num_heads=HEADS, initializer_factor=2.0)
    model = transformers.T5EncoderModel(config)
    return model, [block.layer[0].SelfAttention.o for block in model.encoder.block], "input_ids"


def whisper_encoder():
    config = transformers.WhisperConfig(num_mel_bins=16, max_source_positions=32, d_model=HIDDEN, encoder_layers=2,
                                        decoder_layers=1, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=256, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, init_std=0.2)
    encoder = transformers.WhisperModel(config).get_encoder()
    return encoder, [layer.self_attn.out_proj for layer in encoder.layers], "input_features"


def _inputs(name: str, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "input_ids":
        return rng.integers(3, 256, (count, 16), dtype=np.int64)
    return rng.standard_normal((count, 16, 64)).astype(np.float32)


@pytest.fixture(scope="module", params=[("t5", "legacy"), ("t5", "dynamo"), ("whisper", "legacy"), ("whisper", "dynamo")],
                ids=lambda p: "-".join(p))
def encoder(request, tmp_path_factory):
    family, exporter = request.param
    torch.manual_seed(0)
    model, outputs, name = (t5_encoder if family == "t5" else whisper_encoder)()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for output in outputs:
            output.weight[:, 2 * HEAD_DIM:] = 0  # heads 2 and 3 write nothing
    module = Hidden(model.eval(), name).eval()
    folder = tmp_path_factory.mktemp(f"{family}-{exporter}")
    path, example = folder / "model.onnx", torch.from_numpy(_inputs(name, 2, 5))
    with torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17, input_names=[name],
                              output_names=["last_hidden_state"],
                              dynamic_axes={name: {0: "batch"}, "last_hidden_state": {0: "batch"}})
        else:
            torch.onnx.export(module, (example,), dynamo=True, input_names=[name], output_names=["last_hidden_state"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(path))
    np.savez(folder / "calib.npz", **{name: _inputs(name, 64, 0)})
    np.savez(folder / "eval.npz", **{name: _inputs(name, 8, 1)})
    return folder, name


def test_silent_heads_are_removed_exactly(encoder):
    folder, name = encoder
    result = CliRunner().invoke(main, ["build", str(folder / "model.onnx"), "--calib", str(folder / "calib.npz"),
                                       "--eval", str(folder / "eval.npz"), "--heads-keep", "0.5", "--rank-budget",
                                       "1", "--no-cache", "-o", str(folder / "out"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(layer["status"] == "narrowed" for layer in report["layers"]) == 8  # Q, K, V, O of both blocks
    feeds = {name: np.load(folder / "eval.npz")[name]}
    want = run_model(folder / "model.onnx", feeds)[0]
    got = run_model(folder / "out" / "model.lowrank.onnx", feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
