"""How much the float32 eigensolver changes a build's figures: the same build twice in one process, once as shipped
(layers narrower than lrdeploy.lowrank.decompose.FLOAT32_WIDTH solved in float64) and once with every layer forced
to float32, side by side. MiniLM and SmolLM2-135M are narrower than the threshold, so the forced run is the check
that float32 is exact enough on real models (issue 27: within 0.001 cosine, 1% perplexity).

    python benchmarks/tools/float32_solve.py MODEL --calib C --eval E --record NAME -- [build options]

writes benchmarks/results/float32_solve_cpu/NAME.json with the command, both runs' figures and decompose times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.lowrank import decompose

RESULTS = Path(__file__).resolve().parents[1] / "results" / "float32_solve_cpu"


def figures(report: dict) -> dict:
    """The accuracy figures of each output, and the decompose stage's time."""
    outputs = {}
    for name, output in report["accuracy"]["outputs"].items():
        kept = {key: output[key] for key in ("cosine_mean", "cosine_p5", "topk_agreement") if output.get(key) is not None}
        if output.get("next_token"):
            kept.update({f"next_token_{key}": value for key, value in output["next_token"].items()})
        outputs[name] = kept
    return {"outputs": outputs, "decompose_s": report["timings"].get("decompose"),
            "linear_ratio": report["params"]["linear_ratio"]}


def build(model: str, calib: str, evaluation: str, options: list[str], float32_width: int) -> dict:
    decompose.FLOAT32_WIDTH = float32_width
    out = Path(tempfile.mkdtemp(prefix="float32_solve_"))
    try:
        result = CliRunner().invoke(main, ["build", model, "--calib", calib, "--eval", evaluation, "--no-cache",
                                           "-o", str(out / "build"), "--json", *options])
        if result.exit_code != 0:
            sys.exit(f"build failed: {result.output[-2000:]}")
        return figures(json.loads(result.stdout))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--record", required=True, metavar="NAME")
    ours, options = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) if "--" in sys.argv \
        else (sys.argv[1:], [])  # the build's options after --, passed on as they are
    args = parser.parse_args(ours)
    shipped = decompose.FLOAT32_WIDTH
    runs = {f"as shipped (float32 from width {shipped})": build(args.model, args.calib, args.eval, options, shipped),
            "every layer float32": build(args.model, args.calib, args.eval, options, 1)}
    record = {"command": "python benchmarks/tools/float32_solve.py " + " ".join(sys.argv[1:]), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.record}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main_()
