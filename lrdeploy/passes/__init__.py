"""Graph passes on onnx-graphsurgeon graphs: find linear layers, factorize them. Passes never run a model.

onnx-graphsurgeon logs its own findings (duplicate node names, say) as multi-line warnings; what matters to a user
reaches them as one `Error:` line or a report entry, so its logger is set to errors only."""

from onnx_graphsurgeon.logger import G_LOGGER

G_LOGGER.severity = G_LOGGER.ERROR
