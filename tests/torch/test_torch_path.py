"""The PyTorch path: LowRankLinear, compress (same maths as ONNX), distillation, LoRITa."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lrdeploy.lowrank.decompose import decompose  # noqa: E402
from lrdeploy.torch.compress import apply_factors, collect_input_moments, compress, parameter_count  # noqa: E402
from lrdeploy.torch.distill import DistillConfig, distill, hidden_state_loss, transformer_blocks  # noqa: E402
from lrdeploy.torch.lorita import FactoredLinear, collapse, overparameterize  # noqa: E402
from lrdeploy.torch.lowrank_linear import LowRankLinear  # noqa: E402


class Encoder(torch.nn.Module):
    """A tiny token encoder: embedding → 2 MLP blocks → masked mean pooling."""

    def __init__(self, vocab=50, hidden=64):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(), torch.nn.Linear(4 * hidden, hidden))
            for _ in range(2))

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        mask = attention_mask.unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)


def _batches(count=6, batch=16, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 50, (batch, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def test_low_rank_linear_exports_as_two_matmuls_with_parity(tmp_path):
    import onnx

    from lrdeploy.export.torch_onnx import export_module
    from lrdeploy.lowrank.decompose import LowRankFactors

    rng = np.random.default_rng(0)
    factors = LowRankFactors(rng.standard_normal((32, 8)), rng.standard_normal((8, 48)), rng.standard_normal(48))
    layer = LowRankLinear.from_factors(factors)
    x = torch.randn(5, 32)
    expected = x.double().numpy() @ factors.first @ factors.second + factors.bias
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    result = export_module(torch.nn.Sequential(layer), {"input": torch.randn(3, 7, 32)}, tmp_path / "l.onnx")
    assert result.max_abs_diff <= 1e-4  # outputs are ~40 in size: float32 rounding
    assert [n.op_type for n in onnx.load(str(tmp_path / "l.onnx")).graph.node].count("MatMul") == 2


def test_collected_moments_skip_padding():
    model = Encoder()
    batches = _batches(2)
    first = model.blocks[0][0]
    moments = collect_input_moments(model, {"blocks.0.0": first}, batches)["blocks.0.0"]
    with torch.no_grad():
        rows = torch.cat([model.embed(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).double()
    assert moments.count == sum(int(b["attention_mask"].sum()) for b in batches)
    np.testing.assert_allclose(moments.gram, (rows.T @ rows).numpy(), rtol=1e-6, atol=1e-6)


def test_compress_uses_the_shared_maths_and_meets_budget():
    model, batches = Encoder(), _batches()
    reference_layer = model.blocks[0][0]
    weight = reference_layer.weight.detach().double().numpy().T
    bias = reference_layer.bias.detach().double().numpy()
    moments = collect_input_moments(model, {"blocks.0.0": reference_layer}, batches)["blocks.0.0"]
    result = compress(model, batches, 0.5)
    rank = result.plan["blocks.0.0"]
    expected = decompose("pca", weight, bias, moments).factors(rank)
    replaced = model.blocks[0][0]
    assert isinstance(replaced, LowRankLinear) and replaced.rank == rank
    np.testing.assert_allclose(replaced.first.weight.detach().numpy().T, expected.first, rtol=1e-4, atol=1e-5)
    kept = sum(s.params(result.plan[s.name]) for s in result.shapes) / sum(s.dense_params for s in result.shapes)
    assert kept <= 0.5


def test_apply_factors_finds_modules_by_weight_and_refuses_unknown_weights():
    from lrdeploy.errors import ModelLoadError

    model, batches = Encoder(), _batches(2)
    layer = model.blocks[1][2]
    weight = layer.weight.detach().double().numpy().T
    factors = decompose("svd", weight, layer.bias.detach().double().numpy()).factors(weight.shape[1])
    with torch.no_grad():
        expected = model(**batches[0])
    applied = apply_factors(model, {"onnx/name/of/it": (weight.astype(np.float32), factors)})
    assert applied == {"blocks.1.2": 64} and isinstance(model.blocks[1][2], LowRankLinear)
    with torch.no_grad():  # full-rank factors: the same function
        np.testing.assert_allclose(model(**batches[0]).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelLoadError, match="0 nn.Linear modules carry its weight"):
        apply_factors(model, {"other": (np.ones((64, 256), np.float32), factors)})


def test_short_distillation_lowers_the_loss():
    teacher, batches = Encoder(), _batches(8)
    student = Encoder()
    compress(student, batches[:4], 0.35)
    before = parameter_count(student)
    frozen = student.embed.weight.detach().clone()
    config = DistillConfig(steps=60, lr=3e-3, eval_every=20, freeze_embeddings=True)
    result = distill(student, teacher, batches[:6], batches[6:], config)
    assert result.best > result.initial + 0.001
    assert torch.equal(student.embed.weight, frozen)
    assert parameter_count(student) == before  # still the compressed structure
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert losses[-1] < losses[0]


def test_hidden_state_loss_masks_padding_and_scales_dimensions():
    teacher = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [99.0, 99.0]]])  # last position is padding
    student = teacher + torch.tensor([[[1.0, 10.0], [1.0, 10.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # per dimension: error² / teacher variance over real tokens = 1/1 and 100/100 → mean 1
    assert float(hidden_state_loss([student], [teacher], mask)) == pytest.approx(1.0)
    assert float(hidden_state_loss([teacher], [teacher], mask)) == 0.0


def test_stored_teacher_block_outputs_train_as_the_teacher_run_every_step(monkeypatch):
    from lrdeploy.torch import distill as distill_module

    teacher, batches = Encoder(), _batches(8)
    compressed = Encoder()
    compress(compressed, batches[:4], 0.35)
    config = DistillConfig(steps=20, lr=3e-3, eval_every=10, hidden_weight=1.0)
    runs = {}
    for limit in (distill_module.TEACHER_STATES_LIMIT, 0):  # 0: nothing stored, the teacher runs every step
        monkeypatch.setattr(distill_module, "TEACHER_STATES_LIMIT", limit)
        student = copy.deepcopy(compressed)
        runs[limit] = distill(student, teacher, batches[:6], batches[6:], config, transformer_blocks(teacher))
    stored, every_step = runs.values()
    assert stored.history[0] == every_step.history[0]
    for a, b in zip(stored.history[1:], every_step.history[1:]):  # float16 targets: the same run to ~1e-3
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-3)
        assert a["check"] == pytest.approx(b["check"], abs=1e-4)


def test_teacher_block_outputs_are_stored_in_float16_up_to_the_limit(monkeypatch):
    from lrdeploy.torch import distill as distill_module
    from lrdeploy.torch.distill import BlockOutputs, teacher_targets

    teacher, batches = Encoder(), _batches(4)
    blocks = BlockOutputs(teacher, transformer_blocks(teacher))
    targets = teacher_targets(teacher, batches, blocks)
    with torch.no_grad():
        teacher(**batches[2])
    expected = blocks.take()
    assert [s.dtype for s in targets.states[2]] == [torch.float16] * 2
    for state, reference in zip(targets.states[2], expected):
        torch.testing.assert_close(state.float(), reference, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(targets.outputs[2], teacher(**batches[2]).detach())
    one_batch = sum(s.numel() * 2 for s in targets.states[0])
    monkeypatch.setattr(distill_module, "TEACHER_STATES_LIMIT", one_batch)  # the second batch passes it
    assert teacher_targets(teacher, batches, blocks).states is None
    blocks.close()


def test_distillation_with_block_losses_hooks_the_transformer_blocks():
    teacher, batches = Encoder(), _batches(8)
    student = Encoder()
    compress(student, batches[:4], 0.35)
    assert transformer_blocks(teacher) == ["blocks.0", "blocks.1"]
    config = DistillConfig(steps=40, lr=3e-3, eval_every=20, hidden_weight=1.0)
    result = distill(student, teacher, batches[:6], batches[6:], config, transformer_blocks(teacher))
    assert result.best > result.initial + 0.001
    assert not student.blocks[0]._forward_hooks and not teacher.blocks[0]._forward_hooks  # hooks removed


def test_overparameterize_is_exact_and_collapse_at_full_rank_too():
    model = Encoder()
    batches = _batches(1)
    with torch.no_grad():
        expected = model(**batches[0])
    overparameterize(model, depth=3)
    assert all(isinstance(m, FactoredLinear) for m in (model.blocks[0][0], model.blocks[1][2]))
    assert len(model.blocks[0][0].factors) == 3
    with torch.no_grad():
        np.testing.assert_allclose(model(**batches[0]).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    weight, bias = model.blocks[1][2].product()
    np.testing.assert_allclose(weight.detach().numpy(), Encoder().blocks[1][2].weight.detach().numpy(), atol=1e-5)
    plan = collapse(model, 1.0)
    assert set(plan) == {"blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"}
    assert not any(isinstance(m, FactoredLinear) for m in model.modules())
    with torch.no_grad():  # ρ=1 still truncates just under the break-even rank: close, not exact
        cosine = torch.nn.functional.cosine_similarity(model(**batches[0]), expected, dim=1)
    assert float(cosine.min()) > 0.95


def test_collapse_truncates_under_budget():
    model = overparameterize(Encoder(), depth=2)
    plan = collapse(model, 0.4, rank_multiple=8)
    kept = [r for r in plan.values() if r is not None]
    assert kept and all(r % 8 == 0 for r in kept)
    assert isinstance(model.blocks[0][0], LowRankLinear)


def test_head_cuts_reach_hugging_face_attention_exactly(tmp_path):
    """A head whose value and output rows are zero contributes nothing: cutting it in the torch model (the ONNX
    path's cut, modules found by weight) leaves the outputs unchanged, so HF's attention runs with fewer heads."""
    from types import SimpleNamespace

    from transformers import BertModel

    from lrdeploy.lowrank.neurons import NeuronCut
    from lrdeploy.passes.prune_heads import AttentionBlock
    from lrdeploy.torch.compress import apply_head_cuts
    from tests.factories import tiny_bert_dir

    model = BertModel.from_pretrained(str(tiny_bert_dir(tmp_path / "bert"))).eval()
    attention = model.encoder.layer[0].attention
    head_dim, silent = 16, 2
    with torch.no_grad():
        attention.self.value.weight[silent * head_dim:(silent + 1) * head_dim] = 0
        attention.self.value.bias[silent * head_dim:(silent + 1) * head_dim] = 0
        attention.output.dense.weight[:, silent * head_dim:(silent + 1) * head_dim] = 0
    ids = torch.randint(1, 3000, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state

    def layer(module, name):
        return SimpleNamespace(name=name, weight=module.weight.detach().numpy().T.copy(),
                               bias=module.bias.detach().numpy().copy(), d_in=module.in_features,
                               d_out=module.out_features)

    query, key, value = (layer(getattr(attention.self, n), n) for n in ("query", "key", "value"))
    output = layer(attention.output.dense, "output")
    kept = [0, 1, 3]
    keep = np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
    block = AttentionBlock([query, key, value], output, heads=output.d_in // head_dim)
    names = apply_head_cuts(model, [(block, kept, NeuronCut(keep, output.weight[keep], output.bias, 0.0))])
    assert names == ["encoder.layer.0.attention.self"] and attention.self.query.out_features == 48
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


def test_dropped_blocks_leave_the_hugging_face_layer_list_exactly(tmp_path):
    """A block whose residual branches add nothing (LayerNorms at γ=1, β=0 then re-normalise a normalised
    stream) is removed from the torch model as the ONNX path dropped it (found by its query's weight): the outputs
    stay, the layer list and config shrink, and distillation pairs each kept block with its original."""
    import copy
    from types import SimpleNamespace

    from lrdeploy.errors import ModelLoadError

    from transformers import BertModel

    from lrdeploy.torch.compress import remove_blocks
    from tests.factories import tiny_bert_dir

    model = BertModel.from_pretrained(str(tiny_bert_dir(tmp_path / "bert"))).eval()
    silent = model.encoder.layer[0]
    with torch.no_grad():
        for linear in (silent.attention.output.dense, silent.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
    ids = torch.randint(1, 3000, (3, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    teacher = copy.deepcopy(model)
    query = SimpleNamespace(name="q", weight=silent.attention.self.query.weight.detach().numpy().T.copy())
    assert remove_blocks(model, [(SimpleNamespace(name="block0"), [query], 0.0)]) == [0]
    assert len(model.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    with torch.no_grad():
        got = model(**batch).last_hidden_state
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)

    class Hidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, **inputs):
            return self.bert(**inputs).last_hidden_state

    result = distill(Hidden(model), Hidden(teacher), [batch] * 2, [batch], DistillConfig(steps=2, eval_every=1),
                     [("bert.encoder.layer.0", "bert.encoder.layer.1")])
    assert result.initial == pytest.approx(1.0, abs=1e-5) and len(result.history) == 3
    assert result.history[1]["train_loss"] < 1e-6  # the kept block's output equals its original's: no hidden loss
    with pytest.raises(ModelLoadError, match="block9: none of its layers is an nn.Linear inside"):
        remove_blocks(model, [(SimpleNamespace(name="block9"), [SimpleNamespace(name="x", weight=np.ones((64, 64)))], 0)])


def test_narrower_value_heads_reach_the_hugging_face_attention_exactly(tmp_path):
    """Each head's value weight of rank 4 (rows 4.. zero): its V/O pair narrowed to 4 (value bias folded into O's)
    leaves the outputs as they were, so the replaced self-attention views V with its own head size and Q, K with
    theirs."""
    from types import SimpleNamespace

    from transformers import BertModel

    from lrdeploy.lowrank.value_heads import ValueCut
    from lrdeploy.torch.compress import apply_value_cuts
    from tests.factories import tiny_bert_dir

    model = BertModel.from_pretrained(str(tiny_bert_dir(tmp_path / "bert"))).eval()
    ids = torch.randint(1, 3000, (3, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cuts, keep = [], np.concatenate([np.arange(h * 16, h * 16 + 4) for h in range(4)])
    with torch.no_grad():
        for layer in model.encoder.layer:
            value, output = layer.attention.self.value, layer.attention.output.dense
            for head in range(4):
                value.weight[head * 16 + 4:(head + 1) * 16] = 0
            w_v, b_v = value.weight.numpy().T.copy(), value.bias.numpy().copy()
            w_o, b_o = output.weight.numpy().T.copy(), output.bias.numpy().copy()
            block = SimpleNamespace(projections=[SimpleNamespace(name="v", weight=w_v)],
                                    output=SimpleNamespace(name="o", weight=w_o))
            cuts.append((block, ValueCut(4, w_v[:, keep], w_o[keep], b_o + b_v @ w_o, 0.0)))
        want = model(**batch).last_hidden_state
        assert len(apply_value_cuts(model, cuts)) == 2
        got = model(**batch).last_hidden_state
    assert tuple(model.encoder.layer[0].attention.self.value.weight.shape) == (16, 64)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
