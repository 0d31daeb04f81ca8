"""Graph passes on onnx-graphsurgeon graphs: find linear layers, factorize them. Passes never run a model."""
