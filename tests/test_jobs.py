"""Jobs run here or as Ray tasks (`--ray`) with the same results; without --ray, Ray is never imported."""

import json
import subprocess
import sys

import pytest

from lrdeploy.errors import OptionError
from lrdeploy.jobs import SERIAL, jobs_on


def _square_plus(item, shared):
    return item * item + shared


def test_serial_jobs_run_in_order_and_report_each_result():
    done = []
    assert SERIAL.map(_square_plus, [3, 1, 2], 10, done.append) == [19, 11, 14]
    assert done == [19, 11, 14]
    assert SERIAL.threads(0) == 0


def test_a_build_without_ray_never_imports_it():
    code = ("import sys; from lrdeploy.cli import main; import lrdeploy.pipeline.build, lrdeploy.pipeline.sweep; "
            "from lrdeploy.jobs import jobs_on\n"
            "with jobs_on(None) as jobs: assert jobs.map(pow, [2], 3) == [8]\n"
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


ray = pytest.importorskip("ray")


def test_an_address_ray_cannot_use_is_one_error_naming_the_fix():
    if ray.is_initialized():
        pytest.skip("a Ray of this process is running")
    with pytest.raises(OptionError, match=r"--ray nonsense: no Ray cluster could be reached \(Invalid address.*"
                                          r"ray start --head"):
        with jobs_on("nonsense"):
            pass


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 workers for this module's tests (starting one takes seconds)."""
    with jobs_on("auto", workers=2) as jobs:
        yield jobs


def test_ray_jobs_return_in_order_on_two_workers(local_ray):
    done = []
    assert local_ray.workers == 2 and local_ray.threads(0) == 1 and local_ray.threads(3) == 3
    assert local_ray.map(_square_plus, list(range(6)), 1, done.append) == [1, 2, 5, 10, 17, 26]
    assert sorted(done) == [1, 2, 5, 10, 17, 26]


def test_sensitivity_measured_as_ray_tasks_is_identical(local_ray):
    from tests.stages.test_sensitivity import sensitivity_inputs
    from lrdeploy.stages.sensitivity import measure_sensitivity

    model, layers, decompositions, feeds = sensitivity_inputs()
    here = measure_sensitivity(model, layers, decompositions, 16, feeds, threads=1, group_size=2)
    steps = []
    there = measure_sensitivity(model, layers, decompositions, 16, feeds, threads=1, group_size=2,
                                on_step=lambda: steps.append(1), jobs=local_ray)
    assert there == here  # the same floats, layer by layer and rank by rank
    assert len(steps) == sum(len(ranks) for ranks in here.values())


def test_a_build_with_ray_writes_the_same_model_bytes(local_ray, transformer_files, tmp_path):
    from click.testing import CliRunner

    from lrdeploy.cli import main

    model, calib = transformer_files
    written = {}
    for name, extra in (("here", []), ("ray", ["--ray", "auto"])):
        result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--rank-budget", "0.6",
                                           "--allocation", "sensitivity", "--no-cache", "-o", str(tmp_path / name),
                                           *extra])
        assert result.exit_code == 0, result.output
        written[name] = (tmp_path / name / "tiny.lowrank.onnx").read_bytes()
    assert written["ray"] == written["here"]
    timings = json.loads((tmp_path / "ray" / "report.json").read_text())["timings"]
    assert "ray start" in timings and "sensitivity" in timings  # measured there, not here
