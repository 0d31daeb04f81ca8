"""ONNX → TensorRT engine through Polygraphy's loaders:

    NetworkFromOnnxPath → CreateConfig(precision flags, optimization profile, timing cache)
        → EngineFromNetwork → serialized engine, written atomically

The configuration (profiles, precision flags, timing cache, workspace) is plain data built and checked
without TensorRT, so it is unit-tested anywhere; `build_engine` needs TensorRT and an NVIDIA GPU and
says so in one line when either is missing. `trtexec_command` prints the equivalent trtexec call.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.errors import EngineConfigError
from lrdeploy.runtime.base import PRECISIONS
from lrdeploy.shapes import parse_named_shapes

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def parse_profile_shapes(items: list[str]) -> dict[str, ShapeTriple]:
    """Parse `NAME:MIN[,OPT[,MAX]]` items (e.g. `input_ids:1x128,8x128,32x128`) into min/opt/max per input.

    One shape fixes the input; two are min and max (opt = max); three are min, opt, max.
    """
    profile: dict[str, ShapeTriple] = {}
    parsed = parse_named_shapes(items, "NAME:MIN[,OPT[,MAX]]", "input_ids:1x128,8x128,32x128")
    for item, (name, dims) in zip(items, parsed.items()):
        if len(dims) > 3 or len({len(d) for d in dims}) != 1:
            raise EngineConfigError(f"--shape {item!r}: give one to three shapes of the same rank")
        triple = (dims[0], dims[0], dims[0]) if len(dims) == 1 else (
            (dims[0], dims[1], dims[1]) if len(dims) == 2 else (dims[0], dims[1], dims[2]))
        if any(a > b for a, b in zip(triple[0], triple[1])) or any(a > b for a, b in zip(triple[1], triple[2])):
            raise EngineConfigError(f"--shape {item!r}: shapes must grow from min to opt to max")
        profile[name] = triple
    return profile


@dataclass
class EngineConfig:
    onnx_path: Path
    engine_path: Path
    precision: str = "fp16"
    shapes: dict[str, ShapeTriple] = field(default_factory=dict)
    timing_cache: Path | None = None
    workspace_mib: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineConfigError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    @property
    def precision_flags(self) -> dict[str, bool]:
        """CreateConfig flags: fp32 is strict (TF32 off); best enables every reduced precision."""
        return {
            "fp32": {"tf32": False, "fp16": False, "bf16": False},
            "fp16": {"tf32": True, "fp16": True, "bf16": False},
            "bf16": {"tf32": True, "fp16": False, "bf16": True},
            "best": {"tf32": True, "fp16": True, "bf16": True},
        }[self.precision]


def create_config_loader(config: EngineConfig, memory_pool_limits: dict | None = None):
    """Polygraphy's CreateConfig for `config` (constructing it does not import TensorRT)."""
    from polygraphy.backend.trt import CreateConfig, Profile

    profiles = []
    if config.shapes:
        profile = Profile()
        for name, (low, opt, high) in config.shapes.items():
            profile.add(name, min=low, opt=opt, max=high)
        profiles.append(profile)
    return CreateConfig(
        **config.precision_flags,
        profiles=profiles or None,
        load_timing_cache=str(config.timing_cache) if config.timing_cache and config.timing_cache.exists() else None,
        memory_pool_limits=memory_pool_limits,
    )


def trtexec_command(config: EngineConfig) -> str:
    """The trtexec call that builds the same engine."""
    args = ["trtexec", f"--onnx={config.onnx_path}", f"--saveEngine={config.engine_path}"]
    args += {"fp32": ["--noTF32"], "fp16": ["--fp16"], "bf16": ["--bf16"], "best": ["--fp16", "--bf16"]}[config.precision]
    if config.shapes:
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(flag + "=" + ",".join(f"{n}:{'x'.join(map(str, s[index]))}" for n, s in config.shapes.items()))
    if config.timing_cache:
        args.append(f"--timingCacheFile={config.timing_cache}")
    if config.workspace_mib:
        args.append(f"--memPoolSize=workspace:{config.workspace_mib}M")
    return " ".join(shlex.quote(a) for a in args)


def build_engine(config: EngineConfig) -> Path:
    """Build and save the engine (atomically); needs TensorRT and an NVIDIA GPU."""
    from lrdeploy.files import atomic_path
    from lrdeploy.runtime.tensorrt import require_cuda_device, require_tensorrt

    trt = require_tensorrt()
    require_cuda_device()
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath

    limits = {trt.MemoryPoolType.WORKSPACE: config.workspace_mib << 20} if config.workspace_mib else None
    loader = EngineFromNetwork(
        NetworkFromOnnxPath(str(config.onnx_path)),
        config=create_config_loader(config, limits),
        save_timing_cache=str(config.timing_cache) if config.timing_cache else None,
    )
    engine = loader()
    with atomic_path(config.engine_path) as tmp:
        tmp.write_bytes(bytes(engine.serialize()))
    return config.engine_path
