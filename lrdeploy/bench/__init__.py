"""Latency measurement: trtexec-style timing of runners (`measure`), synthetic timing feeds (`feeds`), and
per-layer-shape timings of dense against split layers (`layer_latency`). Rendering lives in `lrdeploy.report`."""
