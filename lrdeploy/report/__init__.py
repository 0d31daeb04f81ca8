"""Reports: the report model (dataclasses: `model`), and its renderings — Markdown (`markdown`), one
self-contained HTML page (`html`) with matplotlib plots (`plots`) — written atomically (`files`).
Latency figures come from `lrdeploy.bench` as measured; this package only renders them."""
