"""A/B one distillation variant on a frozen student: held-out cosine / top-10 in torch."""
import argparse, copy, json, math, time
import numpy as np, torch
from lrdeploy.torch import distill as TD
from lrdeploy.torch.distill_config import DistillConfig
from lrdeploy.stages.validate import neighbour_agreement

ap = argparse.ArgumentParser()
ap.add_argument("frozen"); ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--lr", type=float, default=3e-4); ap.add_argument("--hidden", type=float, default=1.0)
ap.add_argument("--outw", type=float, default=1.0, help="weight of 1-cos")
ap.add_argument("--attn", default="eager"); ap.add_argument("--bf16", action="store_true")
ap.add_argument("--hidden-decay", action="store_true", help="hidden weight follows the lr schedule")
ap.add_argument("--batch-mult", type=int, default=1)
ap.add_argument("--tag", default="")
ap.add_argument("--save", default="")
ap.add_argument("--attn-states", action="store_true")
ap.add_argument("--freeze-word", action="store_true")
ap.add_argument("--extra", default="")
ap.add_argument("--dropout", action="store_true")
ap.add_argument("--wd", type=float, default=0.01)
ap.add_argument("--bank", type=float, default=0.0, help="weight of the KL over similarities to teacher embeddings")
ap.add_argument("--tau", type=float, default=0.05)
ap.add_argument("--covw", type=float, default=0.0, help="weight of the teacher-covariance-weighted error")
ap.add_argument("--ema", type=float, default=0.0)
ap.add_argument("--l2sp", type=float, default=0.0, help="weight of the squared drift from the cut student's starting weights (L2-SP)")
a = ap.parse_args()
F = torch.load(a.frozen, weights_only=False)
class Embedder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__(); self.encoder = encoder
    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)
teacher, student = Embedder(F["teacher"]).eval(), Embedder(F["student"])
for m in (teacher, student):
    m.encoder.config._attn_implementation = a.attn
torch.manual_seed(0)
train, check, evalb = F["train"], F["check"], F["eval"]
if a.extra:
    train = train + torch.load(a.extra, weights_only=False)
    print("train batches", len(train))
pairs = F["hidden"]
if a.attn_states:
    pairs = pairs + [(m + ".attention", t + ".attention") for m, t in pairs]
sb = TD.BlockOutputs(student, [p[0] for p in pairs]); tb = TD.BlockOutputs(teacher, [p[1] for p in pairs])
t0 = time.time()
targets = TD.teacher_targets(teacher, train, tb)
print(f"teacher targets {time.time()-t0:.1f}s", flush=True)
with torch.no_grad():
    teacher.eval(); eval_t = [teacher(**b) for b in evalb]
def held_out():
    student.eval()
    with torch.no_grad():
        outs = [student(**b) for b in evalb]
    s = torch.cat(outs).numpy(); t = torch.cat(eval_t).numpy()
    cos = float(np.mean(np.sum(s*t,1)/np.linalg.norm(s,axis=1)/np.linalg.norm(t,axis=1)))
    return cos, neighbour_agreement(t, s, 10)
print("start", held_out(), flush=True)
bank = torch.cat(targets.outputs)  # teacher unit embeddings of all training sentences
offsets = np.cumsum([0] + [len(o) for o in targets.outputs])
covroot = None
if a.covw:
    centred = bank - bank.mean(0)
    cov = centred.T @ centred / len(bank)
    ev, U = torch.linalg.eigh(cov)
    covroot = U * ev.clamp_min(0).sqrt() / ev.clamp_min(0).sum().sqrt()  # Δ·covroot: error weighted by spread, /trace
cfg = DistillConfig(steps=a.steps, lr=a.lr)
if a.freeze_word:
    student.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=a.lr, weight_decay=a.wd)
sched = TD._schedule(opt, cfg)
order = TD._batch_order(len(train), a.steps, 0)
ema = None
start = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad} if a.l2sp else {}
if a.ema:
    ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
def ema_eval():
    live = copy.deepcopy(student.state_dict()); student.load_state_dict(ema); r = held_out(); student.load_state_dict(live); return r
t0 = time.time()
for step, idx in enumerate(order, 1):
    student.train(a.dropout)
    batch = train[idx]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
        out = student(**batch)
        theirs = [s.float() for s in targets.states[idx]]
        mine = sb.take()
    out = out.float(); mine = [m.float() for m in mine]
    tt = targets.outputs[idx]
    cosl = (1 - torch.nn.functional.cosine_similarity(out, tt, dim=1)).mean()
    hw = a.hidden * (0.5*(1+math.cos(math.pi*step/a.steps)) if a.hidden_decay else 1.0)
    loss = a.outw * cosl + torch.nn.functional.mse_loss(out, tt) + hw * TD.hidden_state_loss(mine, theirs, batch["attention_mask"])
    if a.bank:
        keep = torch.ones(len(bank), dtype=torch.bool); keep[offsets[idx]:offsets[idx + 1]] = False
        keys = bank[keep]
        logp_s = torch.log_softmax(out @ keys.T / a.tau, dim=1)
        p_t = torch.softmax(tt @ keys.T / a.tau, dim=1)
        loss = loss + a.bank * torch.nn.functional.kl_div(logp_s, p_t, reduction="batchmean")
    if covroot is not None:
        loss = loss + a.covw * ((out - tt) @ covroot).pow(2).sum(1).mean()
    if a.l2sp:
        loss = loss + a.l2sp * sum((p - start[n]).pow(2).sum() for n, p in student.named_parameters() if n in start)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
    if ema is not None:
        with torch.no_grad():
            for k, v in student.state_dict().items():
                if v.dtype.is_floating_point: ema[k].mul_(a.ema).add_(v, alpha=1 - a.ema)
                else: ema[k].copy_(v)
    if step % 200 == 0 or step == a.steps:
        print(f"step {step} {time.time()-t0:.0f}s loss {float(loss):.4f} cos {float(cosl):.4f} held-out {held_out()}" + (f" ema {ema_eval()}" if ema is not None else ""), flush=True)
el = time.time() - t0
res = held_out()
if a.save:
    sb.close(); tb.close()
    torch.save(student.encoder, a.save)
print(json.dumps({"tag": a.tag, "args": vars(a), "sec_per_step": el / a.steps, "held_out_cos": res[0], "top10": res[1]}), flush=True)
