"""`import lrdeploy` and `lrdeploy --help` must work without loading onnxruntime, torch or TensorRT."""

import subprocess
import sys

HEAVY = ("onnxruntime", "torch", "tensorrt", "transformers", "polygraphy")


def test_import_and_help_do_not_load_heavy_packages():
    code = (
        "import sys, lrdeploy, lrdeploy.cli\n"
        "from click.testing import CliRunner\n"
        "result = CliRunner().invoke(lrdeploy.cli.main, ['build', '--help'])\n"
        "assert result.exit_code == 0 and '--rank-budget' in result.output, result.output\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
