"""A rewritten graph's big constants go to the output's data file one at a time, before export: the exported
proto holds references, and the written model runs like the graph it came from."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from lrdeploy.weights import MAPPED_MIN_BYTES
from lrdeploy.weights_out import ALIGNMENT, write_constants_out


def test_big_constants_are_written_page_aligned_and_exported_as_references(tmp_path):
    rng = np.random.default_rng(0)
    held = rng.standard_normal((512, 1024)).astype(np.float32)
    first = held[:, :512]  # a view, as factors are of their decomposition: not contiguous
    second = rng.standard_normal((512, 600)).astype(np.float32)
    bias = rng.standard_normal(600).astype(np.float32)  # small: stays inline
    x = gs.Variable("x", np.float32, ["b", 512])
    middle, y = gs.Variable("m", np.float32), gs.Variable("y", np.float32, ["b", 600])
    z = gs.Variable("z", np.float32, ["b", 600])
    constants = [gs.Constant("a", first), gs.Constant("b", second), gs.Constant("c", bias)]
    graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, constants[0]], outputs=[middle]),
                            gs.Node("MatMul", inputs=[middle, constants[1]], outputs=[y]),
                            gs.Node("Add", inputs=[y, constants[2]], outputs=[z])],
                     inputs=[x], outputs=[z], opset=17)
    data = tmp_path / "model.onnx.data"
    write_constants_out(graph, data, None)

    proto = gs.export_onnx(graph)
    tensors = {t.name: t for t in proto.graph.initializer}
    assert not tensors["a"].raw_data and tensors["a"].data_location == onnx.TensorProto.EXTERNAL
    assert len(tensors["c"].raw_data) == 4 * 600 < MAPPED_MIN_BYTES
    offsets = {name: {e.key: e.value for e in tensors[name].external_data} for name in ("a", "b")}
    assert all(int(entry["offset"]) % ALIGNMENT == 0 and entry["location"] == data.name for entry in offsets.values())
    on_disk = np.fromfile(data, np.uint8)
    for name, expected in (("a", first), ("b", second)):
        start, length = int(offsets[name]["offset"]), int(offsets[name]["length"])
        np.testing.assert_array_equal(on_disk[start:start + length].view(np.float32).reshape(expected.shape), expected)

    onnx.save(proto, tmp_path / "model.onnx")
    feed = rng.standard_normal((3, 512)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": feed})[0], feed @ first @ second + bias, rtol=1e-4, atol=1e-2)
