"""Issues 25 and 26's table as a regression test: every encoder family from torch's legacy and dynamo exporters,
and Optimum's graphs kept in tests/data/optimum/ (encoders, decoders, Llama and GPT-2 with and without their KV
cache), built with each of six cuts; every cell runs and passes its checks
(validated in ONNX Runtime, matrices shrunk as reported) or stops with the one `Error:` line expected of it.
The table with figures: benchmarks/tools/family_matrix.py.

Each torch family is exported by one exporter here, the two alternating down the list, so that CI stays within its
time; LRDEPLOY_FULL_MATRIX=1 runs every family with both (what a change to the graph passes should be checked on)."""

import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

from tests.families import CUTS, export, family_models, run_cell  # noqa: E402
from tests.optimum_graphs import graph_inputs, optimum_graph  # noqa: E402

KV_CACHE = "--heads-keep would change the head count of the model's KV cache"
CACHE_OUTPUT = "is also read by the graph's outputs"
MERGED = "inside the branches of an If (a merged decoder"
OPTIMUM_REFUSALS = {  # (graph, cut): what its Error line says; every other cell runs
    ("t5_decoder.onnx", "heads 0.5"): KV_CACHE, ("t5_decoder.onnx", "drop 1"): CACHE_OUTPUT,
    ("whisper_decoder.onnx", "heads 0.5"): KV_CACHE, ("whisper_decoder.onnx", "drop 1"): CACHE_OUTPUT,
    ("llama_with_past.onnx", "heads 0.5"): KV_CACHE, ("llama_with_past.onnx", "drop 1"): CACHE_OUTPUT,
    ("gpt2_with_past.onnx", "heads 0.5"): KV_CACHE, ("gpt2_with_past.onnx", "drop 1"): CACHE_OUTPUT,
    **{("t5_decoder_merged.onnx", cut): MERGED for cut in CUTS},
}
OPTIMUM_GRAPHS = ["bert_classifier.onnx", "clip.onnx", "clip_vision.onnx", "swin.onnx", "t5_encoder.onnx",
                  "t5_decoder.onnx", "whisper_decoder.onnx", "t5_decoder_merged.onnx", "llama.onnx",
                  "llama_with_past.onnx", "gpt2.onnx", "gpt2_with_past.onnx"]


def _torch_exports() -> list[tuple[str, str]]:
    """(family, exporter) cells: each family with both exporters under LRDEPLOY_FULL_MATRIX=1, else alternating."""
    exporters = ("legacy", "dynamo")
    families = list(family_models())
    if os.environ.get("LRDEPLOY_FULL_MATRIX") == "1":
        return [(family, exporter) for family in families for exporter in exporters]
    return [(family, exporters[index % 2]) for index, family in enumerate(families)]


def _run_cuts(model, calib, evaluation, folder):
    np.savez(folder / "calib.npz", **calib)
    np.savez(folder / "eval.npz", **evaluation)
    return {cut: run_cell(model, folder / "calib.npz", folder / "eval.npz", options, folder / cut.replace(" ", "_"))
            for cut, options in CUTS.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("family", "exporter"), _torch_exports())
def test_every_cut_runs_on_torch_exports(tmp_path, family, exporter):
    make_model, make_inputs = family_models()[family]
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    calib, evaluation = make_inputs(64, 0), make_inputs(16, 1)
    export(make_model(), calib, tmp_path / "model.onnx", exporter)
    cells = _run_cuts(tmp_path / "model.onnx", calib, evaluation, tmp_path)
    assert {cut: outcome for cut, (outcome, _) in cells.items()} == {cut: "ok" for cut in CUTS}, cells


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMUM_GRAPHS)
def test_every_cut_runs_or_says_why_on_optimum_graphs(tmp_path, name):
    model = optimum_graph(name, tmp_path / name)
    cells = _run_cuts(model, graph_inputs(model, 64, 0), graph_inputs(model, 16, 1), tmp_path)
    for cut, (outcome, detail) in cells.items():
        expected = OPTIMUM_REFUSALS.get((name, cut))
        assert (outcome, expected is None or expected in detail) == ("ok" if expected is None else "error", True), \
            f"{cut}: {outcome} {detail}"
