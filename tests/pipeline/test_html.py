"""report.html is one self-contained page: embedded images, tables, no external references."""

import re
from html.parser import HTMLParser

from click.testing import CliRunner

from lrdeploy.cli import main


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, name, value) for name, value in attrs if name in ("src", "href")]


def test_build_report_html_structure(transformer_files, tmp_path):
    model, calib = transformer_files
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "-o", str(tmp_path), "--bench"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    parser = Collector()
    parser.feed(page)
    images = [value for tag, name, value in parser.refs if tag == "img"]
    assert len(images) >= 3  # ranks, spectra, latency
    assert all(v.startswith("data:image/png;base64,") and len(v) > 1000 for v in images)
    assert all(tag == "img" for tag, _, _ in parser.refs)  # no links, scripts or stylesheets to fetch
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"https?://", page)
    assert parser.tags.count("table") >= 3  # accuracy, latency, layers (and run)
    assert "layer0/intermediate/MatMul" in page and "Why features, not weights" in page


def test_a_model_of_many_layers_is_shown_as_blocks_by_projections():
    """At 48+ layers one bar per layer is a smear: the page shows a blocks × projections heatmap of the weights
    kept (read from the names) and folds the layer table."""
    from lrdeploy.report.model import LayerRecord
    from lrdeploy.report.plots import block_grid

    layers = [LayerRecord(f"/model/layers.{b}/{p}/MatMul", "MatMul", 64, 64, 32, 4096, 4096 // (1 + b % 2), "factorized",
                          "") for b in range(12) for p in ("self_attn/q_proj", "self_attn/o_proj", "mlp/up_proj",
                                                           "mlp/down_proj")]
    blocks, projections, cells = block_grid(layers)
    assert blocks == list(range(12)) and projections == ["self_attn/q_proj", "self_attn/o_proj", "mlp/up_proj",
                                                         "mlp/down_proj"]
    assert cells[(3, "mlp/up_proj")].name == "/model/layers.3/mlp/up_proj/MatMul"
    assert block_grid(layers[:12]) is None  # three blocks say too little for a grid
