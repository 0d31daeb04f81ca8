import sys, numpy as np, torch
F = torch.load(sys.argv[2], weights_only=False)  # FROZEN.pt of make_student.py
student = torch.load(sys.argv[1], weights_only=False).eval(); teacher = F["teacher"].eval()
extra = torch.load(sys.argv[3], weights_only=False)  # EXTRA.pt of extra_text.py
def emb(enc, batches):
    out = []
    with torch.no_grad():
        for b in batches:
            h = enc(**b).last_hidden_state; m = b["attention_mask"].unsqueeze(-1).float()
            p = (h*m).sum(1)/m.sum(1); out.append(torch.nn.functional.normalize(p, dim=-1))
    return torch.cat(out)
rng = np.random.default_rng(1)
for name, batches in (("train", [F["train"][i] for i in rng.permutation(len(F["train"]))[:40]]), ("check", F["check"]),
                      ("eval", F["eval"]), ("unseen extra", [extra[i] for i in rng.permutation(len(extra))[:40]])):
    s, t = emb(student, batches), emb(teacher, batches)
    print(name, round(float((s*t).sum(1).mean()), 4))
