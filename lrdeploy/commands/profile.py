"""`lrdeploy profile`: time dense layers against their low-rank splits on this machine's runtime, for a model's
layer shapes (or BERT-base's) over a grid of ranks and token counts, and write a device profile
(`bench.profiles`: documented JSON) that `build --profile FILE` plans with on any machine.

Each (shape, token count) is one alternated run of the dense layer and every split, bound to the device
(`measure.time_shape`): the device's work only, as trtexec's GPU Compute Time.
"""

from __future__ import annotations

import json
import platform
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from lrdeploy.bench.layer_latency import Shape, time_shapes
from lrdeploy.bench.profiles import FORMAT
from lrdeploy.errors import OptionError
from lrdeploy.files import check_output_dir, output_set
from lrdeploy.lowrank.allocate import LayerShape
from lrdeploy.settings.build import PROFILE_BACKENDS
from lrdeploy.progress import SILENT, Progress

PROFILE_PRECISIONS = {"ort-cpu": ("fp32",), "ort-cuda": ("fp16", "fp32"), "torch-cpu": ("fp32",),
              "torch-cuda": ("fp16", "bf16", "fp32")}  # per PROFILE_BACKENDS entry; the first is the default
BERT_BASE_SHAPES: tuple[Shape, ...] = ((768, 768), (768, 2304), (768, 3072), (3072, 768))


@dataclass
class ProfileSettings:
    output: Path
    _: KW_ONLY  # the rest by name: wide records built positionally hide their mistakes
    backend: str = "ort-cpu"
    precision: str | None = None  # None: fp16 on ort-cuda, fp32 on ort-cpu
    tokens: tuple[int, ...] = (128, 1024, 4096, 16384)
    model: Path | None = None  # profile this model's layer shapes (default: BERT-base's)
    rank_multiple: int = 64
    iterations: int = 15
    threads: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in PROFILE_BACKENDS:
            raise OptionError(f"--backend {self.backend!r} cannot be profiled here; use one of {', '.join(PROFILE_BACKENDS)}")
        allowed = PROFILE_PRECISIONS[self.backend]
        self.precision = self.precision or allowed[0]
        if self.precision not in allowed:
            raise OptionError(f"--precision {self.precision} cannot be profiled on {self.backend}; use "
                              f"{' or '.join(allowed)} there")

    @property
    def runtime(self) -> str:
        return self.backend.split("-")[0]

    @property
    def device(self) -> str:
        return self.backend.split("-")[1]


def profile_shapes(model: Path | None, rank_multiple: int) -> list[Shape]:
    """The distinct shapes of the model's eligible linear layers, or BERT-base's."""
    if model is None:
        return list(BERT_BASE_SHAPES)
    from lrdeploy.stages.inspect import inspect_model

    return list(dict.fromkeys((layer.d_in, layer.d_out) for layer in inspect_model(model, rank_multiple).require_eligible()))


def split_ranks(shape: Shape, multiple: int) -> set[int]:
    """Every multiple of `multiple` whose split saves parameters."""
    return set(LayerShape("", *shape).saving_ranks(multiple))


def run_profile(settings: ProfileSettings, progress: Progress = SILENT) -> dict:
    """Measure and write the profile; returns it."""
    check_output_dir(settings.output.parent)
    shapes = profile_shapes(settings.model, settings.rank_multiple)
    needed = {shape: split_ranks(shape, settings.rank_multiple) for shape in shapes}
    rows = []
    step = progress.steps("profiling", len(needed) * len(settings.tokens))
    for tokens in settings.tokens:
        for shape, ranks in needed.items():
            timing = time_shapes({shape: ranks}, tokens, settings.device, settings.threads, settings.iterations,
                                 precision=settings.precision, runtime=settings.runtime)[shape]
            rows.append({"d_in": shape[0], "d_out": shape[1], "tokens": tokens, "rank": None, "ms": timing.dense_ms})
            rows += [{"d_in": shape[0], "d_out": shape[1], "tokens": tokens, "rank": r, "ms": ms}
                     for r, ms in sorted(timing.split_ms.items())]
            step()
    profile = {
        "format": FORMAT, "name": settings.name or settings.output.stem, "device": _device(settings),
        "backend": settings.backend, "precision": settings.precision, "versions": _versions(settings.runtime),
        "seed": False, "source": f"measured by `lrdeploy profile` ({RUNTIME_NAMES[settings.runtime]}, inputs on the "
                                 "device, runs alternated, median)",
        "command": (f"lrdeploy profile {settings.model or ''} --backend {settings.backend} --precision "
                    f"{settings.precision} --tokens {','.join(map(str, settings.tokens))} --rank-multiple "
                    f"{settings.rank_multiple} --iterations {settings.iterations} -o {settings.output}").replace("  ", " "),
        "split_form": SPLIT_FORMS[settings.runtime],
        "rows": rows,
    }
    with output_set(settings.output.parent) as stage:
        (stage / settings.output.name).write_text(json.dumps(profile, indent=1) + "\n")
    return profile


RUNTIME_NAMES = {"ort": "ONNX Runtime, I/O bound", "torch": "PyTorch, CUDA graphs on GPU"}
SPLIT_FORMS = {"ort": "dense: MatMul + Add(bias); split: MatMul(A) then MatMul(B) + Add(bias)",
               "torch": "dense: nn.Linear; split: nn.Linear(d_in, k, bias=False) then nn.Linear(k, d_out)"}


def _device(settings: ProfileSettings) -> str:
    if settings.device == "cuda" and settings.runtime == "torch":
        import torch

        return torch.cuda.get_device_name()
    if settings.device == "cuda":
        import subprocess

        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, check=True).stdout.splitlines()[0].strip()
        except (OSError, subprocess.CalledProcessError, IndexError):
            return "CUDA GPU"
    from lrdeploy.runtime.onnxruntime import cpu_description

    return cpu_description() or platform.machine()


def _versions(runtime: str) -> dict[str, str]:
    if runtime == "torch":
        import torch

        return {"torch": torch.__version__, **({"cuda": torch.version.cuda} if torch.version.cuda else {})}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}
