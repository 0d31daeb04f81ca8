"""Does a linear map on the pooled embedding close the gap? Fit on training sentences, test on eval."""
import sys, numpy as np, torch
from lrdeploy.stages.validate import neighbour_agreement
F = torch.load(sys.argv[2], weights_only=False)  # FROZEN.pt of make_student.py
student = torch.load(sys.argv[1], weights_only=False).eval(); teacher = F["teacher"].eval()
def pooled(enc, batches, n=None):
    out = []
    with torch.no_grad():
        for b in batches[:n]:
            h = enc(**b).last_hidden_state; m = b["attention_mask"].unsqueeze(-1).float()
            out.append(((h*m).sum(1)/m.sum(1)).numpy())
    return np.concatenate(out).astype(np.float64)
idx = np.random.default_rng(0).permutation(len(F["train"]))[:150]
tr = [F["train"][i] for i in idx]
S, T = pooled(student, tr), pooled(teacher, tr)
Se, Te = pooled(student, F["eval"]), pooled(teacher, F["eval"])
def nrm(x): return x/np.linalg.norm(x,axis=1,keepdims=True)
def report(name, s):
    cos = np.mean(np.sum(nrm(s)*nrm(Te),1)); print(name, round(float(cos),4), neighbour_agreement(Te, s, 10))
report("as is", Se)
X = np.hstack([S, np.ones((len(S),1))]); Xe = np.hstack([Se, np.ones((len(Se),1))])
for lam in (1e-3, 1e-2, 1e-1, 1):
    W = np.linalg.solve(X.T@X + lam*len(S)*np.eye(X.shape[1]), X.T@T)
    report(f"affine ridge {lam}", Xe@W)
