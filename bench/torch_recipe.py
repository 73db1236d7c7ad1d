#!/usr/bin/env python3
"""Train the PyTorch reference of mnist-dits (../shared/bench) with a given recipe on the shipped
MNIST, then report the EMA model's test L1 with the true and a wrong label at t = 50 and 300 (how
well it denoises, and whether it uses the label) and write torch_recipe_<tag>.png: 1000-step
DDPM samples, a row per class. Used to tell recipe problems from port problems: dits and this
script run the same recipe with the same numerics.

  python bench/torch_recipe.py --lr 1e-3 --batch 64 --steps 1874 --loss l1 --tag default
"""
import gzip, sys, time, copy, struct, zlib, torch, numpy as np
import os
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "shared", "bench"))
DATA = os.path.join(HERE, "..", "data", "mnist")
import torch_ref_mnist_dits as ref
import torch.nn.functional as F
import argparse
ap=argparse.ArgumentParser(); ap.add_argument("--lr",type=float,default=1e-3); ap.add_argument("--batch",type=int,default=64)
ap.add_argument("--steps",type=int,default=1874); ap.add_argument("--loss",default="l1"); ap.add_argument("--tag",default="x"); ap.add_argument("--threads",type=int,default=1)
ap.add_argument("--warmup",type=int,default=0)
A=ap.parse_args()
torch.set_num_threads(A.threads); torch.manual_seed(0)
def idx(p, off): return np.frombuffer(gzip.open(p).read(), np.uint8, offset=off)
X = torch.tensor(idx(DATA + "/train-images-idx3-ubyte.gz", 16).reshape(-1,1,28,28).astype(np.float32)/127.5-1)
Y = torch.tensor(idx(DATA + "/train-labels-idx1-ubyte.gz", 8).astype(np.int64))
m = ref.DiT(); ema = copy.deepcopy(m); opt = torch.optim.Adam(m.parameters(), lr=1e-3)
sa, s1a = ref.ddpm_tables(); B=A.batch; step=0; t0=time.time()
for ep in range(100):
    if step >= A.steps: break
    perm = torch.randperm(len(X))
    for i in range(len(X)//B):
        ix = perm[i*B:(i+1)*B]; x0=X[ix]; y=Y[ix]
        if step >= A.steps: break
        for g in opt.param_groups: g["lr"] = A.lr*min(1.0,(step+1)/A.warmup) if A.warmup else A.lr
        t = torch.randint(0,1000,(B,)); eps=torch.randn_like(x0)
        xt = sa[t].view(B,1,1,1)*x0+s1a[t].view(B,1,1,1)*eps
        pred = m(xt,t,y); loss = F.l1_loss(pred,eps) if A.loss=="l1" else F.mse_loss(pred,eps)
        opt.zero_grad(); loss.backward(); opt.step()
        d = min(0.999, (1+step)/(10+step)); step += 1
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), m.parameters()): pe.mul_(d).add_(pm, alpha=1-d)
        if step % 200 == 0: print(step, loss.item(), f"{time.time()-t0:.0f}s", flush=True)
betas = torch.linspace(1e-4, 0.02, 1000); alphas = 1-betas; ab = torch.cumprod(alphas, 0)
abp = torch.cat([torch.tensor([1.0]), ab[:-1]]); var = (1-alphas)*(1-abp)/(1-ab)
def sample(model):
    model.eval(); y = torch.arange(10).repeat_interleave(10); x = torch.randn(100,1,28,28)
    with torch.no_grad():
        for tv in range(999,-1,-1):
            t = torch.full((100,), tv); e = model(x,t,y)
            mean = (x - (1-alphas[tv])/torch.sqrt(1-ab[tv])*e)/torch.sqrt(alphas[tv])
            x = mean + (torch.randn_like(x)*torch.sqrt(var[tv]) if tv>0 else 0)
            x = x.clamp(-1,1)
    return x
def png(path, x):
    g = ((x.reshape(10,10,28,28).permute(0,2,1,3).reshape(280,280)+1)*127.5).round().clamp(0,255).byte().numpy()
    raw = b"".join(b"\x00"+g[r].tobytes() for r in range(280))
    chunk = lambda t,d: struct.pack(">I",len(d))+t+d+struct.pack(">I",zlib.crc32(t+d)&0xffffffff)
    open(path,"wb").write(b"\x89PNG\r\n\x1a\n"+chunk(b"IHDR",struct.pack(">IIBBBBB",280,280,8,0,0,0,0))+chunk(b"IDAT",zlib.compress(raw))+chunk(b"IEND",b""))
Xt = torch.tensor(idx(DATA + "/t10k-images-idx3-ubyte.gz", 16).reshape(-1,1,28,28)[:512].astype(np.float32)/127.5-1)
Yt = torch.tensor(idx(DATA + "/t10k-labels-idx1-ubyte.gz", 8)[:512].astype(np.int64))
ema.eval(); g=torch.Generator().manual_seed(0)
for tv in [50,300]:
    t=torch.full((512,),tv); e=torch.randn(Xt.shape,generator=g); xt=sa[t].view(-1,1,1,1)*Xt+s1a[t].view(-1,1,1,1)*e
    with torch.no_grad(): print(A.tag, f"t={tv} ema L1 true={(ema(xt,t,Yt)-e).abs().mean():.4f} wrong={(ema(xt,t,(Yt+3)%10)-e).abs().mean():.4f}", flush=True)
png(f"torch_recipe_{A.tag}.png", sample(ema)); print(A.tag, "done", f"{time.time()-t0:.0f}s")
