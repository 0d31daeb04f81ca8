"""Device profiles: measured latencies of dense layers against their low-rank splits, per layer shape, rank and
token count, on one device, runtime and precision; what a build plans with on a machine that is not the target.

A profile is JSON (`format` "lrdeploy-device-profile-v1"):

    {format, name, device, backend, precision, versions {package: version}, seed: bool, source, command,
     rows [{d_in, d_out, tokens, rank: null (dense, with bias) | k (X·A then ·B + bias), ms}]}

`seed: true` marks a profile not measured by `lrdeploy profile` (the shipped `h200-fp16` is converted from the
H200 grid in benchmarks/results/h200_fp16_linear_grid/, docs/gpu-reference.md); reports that use one say so. Between measured token counts, times are
interpolated linearly in log(tokens); ranks must have been measured (the profile's ranks are multiples of 64).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lrdeploy.bench.layer_latency import Shape, ShapeTiming
from lrdeploy.errors import OptionError

FORMAT = "lrdeploy-device-profile-v1"
SHIPPED = ("h200-fp16",)


@dataclass
class DeviceProfile:
    name: str
    device: str
    backend: str
    precision: str
    source: str
    seed: bool
    rows: list[dict] = field(repr=False, default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""

    @classmethod
    def load(cls, spec: str | Path) -> "DeviceProfile":
        """A shipped profile by name (e.g. "h200-fp16") or a profile JSON file."""
        if str(spec) in SHIPPED:
            text = resources.files("lrdeploy").joinpath(f"profiles/{spec}.json").read_text()
        else:
            path = Path(spec)
            if not path.is_file():
                raise OptionError(f"--profile {spec!r} is neither a shipped profile ({', '.join(SHIPPED)}) nor a file; "
                                  "write one with `lrdeploy profile`")
            text = path.read_text()
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(data["name"], data["device"], data["backend"], data["precision"], data["source"],
                       bool(data.get("seed")), data["rows"], data.get("versions", {}), data.get("command", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise OptionError(f"--profile {spec}: not a {FORMAT} file ({exc}); write one with `lrdeploy profile`") from None

    @property
    def label(self) -> str:
        return f"{self.name} ({'seed profile, not measured by lrdeploy' if self.seed else 'measured'})"

    def _curve(self, d_in: int, d_out: int, rank: int | None) -> list[tuple[int, float]]:
        return sorted((r["tokens"], r["ms"]) for r in self.rows
                      if r["d_in"] == d_in and r["d_out"] == d_out and r["rank"] == rank)

    def latency_ms(self, d_in: int, d_out: int, rank: int | None, tokens: int) -> float | None:
        """Milliseconds of the dense layer (`rank` None) or its split at `tokens` rows; None if not profiled. A
        dense shape the grid lacks (a width left by a structured cut, e.g. 9 heads of 32 = 288) is interpolated
        linearly in its width between the nearest profiled widths with the other dimension equal."""
        curve = self._curve(d_in, d_out, rank)
        if not curve:
            return self._between_widths(d_in, d_out, tokens) if rank is None else None
        return self._at_tokens(curve, tokens)

    def _between_widths(self, d_in: int, d_out: int, tokens: int) -> float | None:
        dense = {(r["d_in"], r["d_out"]) for r in self.rows if r["rank"] is None}
        for width, widths, shape_at in ((d_out, sorted(o for i, o in dense if i == d_in), lambda w: (d_in, w)),
                                        (d_in, sorted(i for i, o in dense if o == d_out), lambda w: (w, d_out))):
            below, above = [w for w in widths if w < width], [w for w in widths if w > width]
            if below and above:
                low, high = below[-1], above[0]
                ms_low, ms_high = (self._at_tokens(self._curve(*shape_at(w), None), tokens) for w in (low, high))
                return ms_low + (width - low) / (high - low) * (ms_high - ms_low)
        return None

    def _at_tokens(self, curve: list[tuple[int, float]], tokens: int) -> float | None:
        if tokens <= curve[0][0]:
            return curve[0][1]
        if tokens >= curve[-1][0]:
            return curve[-1][1] * tokens / curve[-1][0]  # past the grid GEMMs are compute-bound: linear in rows
        for (t0, m0), (t1, m1) in zip(curve, curve[1:]):
            if t0 <= tokens <= t1:
                w = (math.log(tokens) - math.log(t0)) / (math.log(t1) - math.log(t0))
                return m0 + w * (m1 - m0)
        return None

    def timings(self, needed: dict[Shape, set[int]], tokens: int) -> dict[Shape, ShapeTiming]:
        """What `layer_latency.time_shapes` would measure, read from the profile (shapes or ranks it lacks left out)."""
        result = {}
        for (d_in, d_out), ranks in needed.items():
            dense = self.latency_ms(d_in, d_out, None, tokens)
            if dense is None:
                continue
            split = {r: ms for r in ranks if (ms := self.latency_ms(d_in, d_out, r, tokens)) is not None}
            result[(d_in, d_out)] = ShapeTiming(d_in, d_out, tokens, dense, split)
        return result
