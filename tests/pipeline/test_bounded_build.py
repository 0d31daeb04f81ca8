"""A build bounded by one group of layers: weights mapped from their external data file, calibration and
decomposition group by group. It writes the same model as the build that holds everything at once."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrdeploy.calib.segments as segments
import lrdeploy.pipeline.build as build_module
from lrdeploy.onnx_io import load_model
from lrdeploy.settings.build import BuildConfig
from lrdeploy.weights import MAPPED_MIN_BYTES

WIDTH, LAYERS = 512, 3  # 512² float32 = 1 MiB: mapped


def write_stack(path, seed=0, external=True):
    """[batch, seq, 512] through three MatMul+Add+Relu layers; weights in an external data file, or inline."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        inits += [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        x = f"h{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "s", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=external, location=f"{path.name}.data",
                    size_threshold=1024)
    calib = path.parent / "calib.npz"
    np.savez(calib, x=rng.standard_normal((24, 64, WIDTH)).astype(np.float32))
    return path, calib


def built(model, calib, out, bounded, monkeypatch):
    monkeypatch.setattr(build_module, "bounded_by_group", lambda config: bounded)
    config = BuildConfig.from_options(model=model, calib=str(calib), output_dir=out, rank_budget=0.5, plan="lowrank")
    result = build_module.build(config)
    return result, onnx.load(str(result.output_model))


def test_mapped_weights_stay_in_their_file(tmp_path):
    model, _ = write_stack(tmp_path / "stack.onnx")
    loaded = load_model(model, map_weights=True)
    weights = {t.name: t for t in loaded.proto.graph.initializer}
    assert weights["w0"].data_location == TensorProto.EXTERNAL and not weights["w0"].raw_data
    assert weights["b0"].data_location == TensorProto.DEFAULT and len(weights["b0"].raw_data) == 4 * WIDTH
    assert 4 * WIDTH < MAPPED_MIN_BYTES <= 4 * WIDTH * WIDTH
    np.testing.assert_array_equal(loaded.weights.view(weights["w0"]),
                                  numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0]))


def test_a_build_group_by_group_writes_the_same_model(tmp_path, monkeypatch):
    """One calibration group per tensor (a Gram limit of one matrix): three passes, three groups decomposed and
    freed in turn; the written factors equal those of the build that calibrates everything first."""
    model, calib = write_stack(tmp_path / "stack.onnx")
    monkeypatch.setattr(segments, "SEGMENT_GRAM_BYTES", 4 * WIDTH * WIDTH)
    import lrdeploy.stages.streamed as streamed
    groups = []
    original = streamed.calibrated_groups

    def counted(*args, **kwargs):
        for moments, cached in original(*args, **kwargs):
            groups.append(sorted(moments))
            yield moments, cached

    monkeypatch.setattr(streamed, "calibrated_groups", counted)
    bounded, bounded_model = built(model, calib, tmp_path / "bounded", True, monkeypatch)
    assert groups == [["x"], ["h0"], ["h1"]]
    whole, whole_model = built(model, calib, tmp_path / "whole", False, monkeypatch)
    a = {t.name: numpy_helper.to_array(t, str(tmp_path / "bounded")) for t in bounded_model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t, str(tmp_path / "whole")) for t in whole_model.graph.initializer}
    assert a.keys() == b.keys() and any(name.endswith("lowrank_a/weight") for name in a)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert bounded.report.accuracy.outputs["h2"].cosine_mean == pytest.approx(
        whole.report.accuracy.outputs["h2"].cosine_mean, abs=1e-6)
    assert bounded.report.timings.keys() >= {"calibrate", "decompose"}
    # the written model carries its own data file, not a reference to the input's
    assert {e.value for t in bounded_model.graph.initializer for e in t.external_data if e.key == "location"} \
        <= {"stack.lowrank.onnx.data"}
    session = ort.InferenceSession(str(bounded.output_model), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 4, WIDTH), np.float32)})[0].shape == (1, 4, WIDTH)


def test_an_inline_model_is_mapped_from_a_temporary_copy_and_written_inline(tmp_path, monkeypatch):
    """A model without external data has its big weights moved to a temporary file to be mapped: the written
    model is the same as the external one's, and inline like its input; the temporary file goes with the build."""
    (tmp_path / "inline").mkdir()
    inline, calib = write_stack(tmp_path / "inline" / "stack.onnx", external=False)
    external, _ = write_stack(tmp_path / "stack.onnx")
    loaded = load_model(inline, map_weights=True)
    temporary = loaded.mapped_dir
    assert temporary != inline.parent and (temporary / "weights.data").is_file()
    assert {t.name for t in loaded.proto.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"w0", "w1", "w2"}
    del loaded
    import gc

    gc.collect()
    assert not temporary.exists()
    from_inline, inline_model = built(inline, calib, tmp_path / "from_inline", True, monkeypatch)
    from_external, external_model = built(external, calib, tmp_path / "from_external", True, monkeypatch)
    assert not any(t.external_data for t in inline_model.graph.initializer)
    b = {t.name: numpy_helper.to_array(t, str(tmp_path / "from_external")) for t in external_model.graph.initializer}
    for tensor in inline_model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), b[tensor.name], err_msg=tensor.name)


def test_a_layer_kept_dense_by_calibration_does_not_raise_another_past_its_decomposition(tmp_path, monkeypatch):
    """Ceilings come from the uniform plan over every layer; one kept dense for too few positions makes the plan
    over the rest richer by a multiple or two, which is clamped to what the decompositions hold, under budget."""
    from lrdeploy.lowrank.allocate import LayerShape, rank_ceilings, uniform_ranks
    from lrdeploy.pipeline.build import within_ceilings

    shapes = [LayerShape(f"{block}{name}", d_in, d_out) for block in range(2) for name, d_in, d_out in
              (("q", 2048, 2048), ("k", 2048, 256), ("v", 2048, 256), ("o", 2048, 2048), ("gate", 2048, 5632),
               ("up", 2048, 5632), ("down", 5632, 2048))]  # two of TinyLlama's blocks
    ceilings = rank_ceilings(shapes, 16, (0.7,))
    richer = uniform_ranks([s for s in shapes if not s.name.endswith("down")], 0.7, 16)  # downs kept dense
    assert any(richer[name] > ceilings[name] for name in richer)  # the case this guards

    class Held:
        def __init__(self, rank):
            self.max_rank = rank

    clamped = within_ceilings(richer, {name: Held(ceilings[name]) for name in richer})
    assert all(clamped[name] <= ceilings[name] for name in clamped)
    assert within_ceilings({"a": None}, {"a": Held(16)}) == {"a": None}
