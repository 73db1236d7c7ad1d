#!/usr/bin/env python3
"""An independent judge of sample quality until `dits eval` exists: a small PyTorch CNN trained
on the shipped MNIST (2 epochs, seeded; ~98.5% test accuracy; cached in bench/.judge_cnn.pt)
scores a directory of `<class>_<index>.png` samples: accuracy of the intended class, overall
and per class, and mean confidence.

  python bench/judge_samples.py samples/            # needs torch, numpy, pillow
"""
import argparse, glob, gzip, os
import numpy as np, torch, torch.nn as nn
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "mnist")
CACHE = os.path.join(HERE, ".judge_cnn.pt")


def idx(path):
    raw = gzip.open(path).read()
    if raw[3] == 3:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(raw, np.uint8, offset=8)


def pixels(a):
    return torch.tensor(a).float().div(127.5).sub(1).unsqueeze(1)


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))


def trained():
    net = cnn()
    if os.path.exists(CACHE):
        net.load_state_dict(torch.load(CACHE))
        return net.eval()
    torch.manual_seed(0)
    x, y = pixels(idx(f"{DATA}/train-images-idx3-ubyte.gz")), torch.tensor(idx(f"{DATA}/train-labels-idx1-ubyte.gz")).long()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            j = perm[i:i + 128]
            loss = nn.functional.cross_entropy(net(x[j]), y[j])
            opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    xt, yt = pixels(idx(f"{DATA}/t10k-images-idx3-ubyte.gz")), torch.tensor(idx(f"{DATA}/t10k-labels-idx1-ubyte.gz")).long()
    with torch.no_grad():
        print(f"judge CNN trained: test accuracy {(net(xt).argmax(1) == yt).float().mean():.4f}")
    torch.save(net.state_dict(), CACHE)
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.samples, "[0-9]_*.png")))
    if not files:
        raise SystemExit(f"error: no <class>_<index>.png files in {a.samples}")
    net = trained()
    x = pixels(np.stack([np.array(Image.open(f).convert("L")) for f in files]))
    y = torch.tensor([int(os.path.basename(f).split("_")[0]) for f in files])
    with torch.no_grad():
        p = net(x).softmax(1)
    ok = p.argmax(1) == y
    per = " ".join(f"{c}:{ok[y == c].float().mean():.2f}" for c in range(10) if (y == c).any())
    print(f"{a.samples}: {len(files)} images, accuracy {ok.float().mean():.3f}, "
          f"mean confidence {p.max(1).values.mean():.3f}; per class {per}")


if __name__ == "__main__":
    main()
