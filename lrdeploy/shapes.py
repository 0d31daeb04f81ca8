"""Shapes written on the command line: `NAME:AxB` (a calibration input's size, `--shape`) and
`NAME:AxB,CxD,ExF` (a TensorRT profile's min, opt and max, `engine --shape`) share one parser."""

from __future__ import annotations

from typing import Sequence

from lrdeploy.errors import OptionError


def parse_named_shapes(items: Sequence[str], form: str, example: str,
                       option: str = "--shape") -> dict[str, list[tuple[int, ...]]]:
    """`NAME:DIMS[,DIMS...]` items (e.g. `input_ids:1x128,8x128`) into {name: [(1, 128), (8, 128)]}.

    Anything else, a dimension below 1 included, is an OptionError that shows `form` and `example`."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for item in items:
        name, sep, text = item.rpartition(":")
        try:
            parsed = [tuple(int(d) for d in dims.lower().split("x")) for dims in text.split(",")]
        except ValueError:
            parsed = []
        if not sep or not name or not parsed or min(min(dims) for dims in parsed) < 1:
            raise OptionError(f"{option} {item!r} is not {form}; write it like {example}")
        shapes[name] = parsed
    return shapes
