#!/usr/bin/env python3
"""Project the parallel layouts measured by bench/scaling.sh to 8, 64 and 256 machines.

    bench/scaling.sh > scaling.txt && bench/project_scaling.py scaling.txt

A machine is the one measured (its cores running one layout inside it: one rank, DP=2,
TP=2 or SP=2); machines are joined by data parallelism over a named network. The model is
the usual alpha-beta one: a message of n bytes costs alpha + n / beta; an all-reduce of n bytes
over M machines costs the cheaper of a ring, 2(M-1) alpha + 2 (M-1)/M n / beta, and a tree,
2 log2(M) (alpha + n / beta); an all-to-all costs (M-1) alpha + (M-1)/M n / beta. Gradients are
summed hierarchically (inside a machine first), so one full fp32 gradient leaves each machine
per step; communication is not overlapped with compute (a pessimistic bound). Compute per step
is the measured machine throughput. Also projected: tensor and sequence parallelism stretched
across machines (groups of 8), to show where per-layer communication dominates.

Weak scaling keeps the measured batch per machine; strong scaling keeps a global batch of 8
machines' batches and divides it (so 256 machines get 1/32 of a machine batch each).
"""
import math
import re
import sys

# Interconnects: (name, alpha seconds, beta bytes/s).
NETWORKS = [
    ("InfiniBand HDR 200 Gb/s", 1.0e-6, 25.0e9),
    ("Ethernet 25 Gb/s (TCP)", 10.0e-6, 3.125e9),
]
MACHINES = [8, 64, 256]
# Shapes of the presets (src/model/config.rs): tokens, width, depth.
SHAPES = {"mnist-dits": (49, 64, 3), "dit-s2": (196, 192, 6), "dit-s4": (49, 192, 6)}


def allreduce(n, m, alpha, beta):
    if m == 1:
        return 0.0
    ring = 2 * (m - 1) * alpha + 2 * (m - 1) / m * n / beta
    tree = 2 * math.log2(m) * (alpha + n / beta)
    return min(ring, tree)


def alltoall(n, m, alpha, beta):
    return 0.0 if m == 1 else (m - 1) * alpha + (m - 1) / m * n / beta


def parse(path):
    models, model = {}, None
    for line in open(path):
        head = re.match(r"model=(\S+) batch=(\d+)", line)
        if head:
            model = head.group(1)
            models[model] = {"batch": int(head.group(2)), "rows": []}
            continue
        cols = line.split()
        if model and len(cols) == 13 and cols[0].isdigit():
            ranks, dp, tp, sp, zero = map(int, cols[:5])
            models[model]["rows"].append(
                {"ranks": ranks, "dp": dp, "tp": tp, "sp": sp, "zero": zero,
                 "rate": float(cols[6]), "params_mib": float(cols[9])})
    return models


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/project_scaling.py SCALING_OUTPUT (from bench/scaling.sh)")
    cpu = open(sys.argv[1]).readline().strip()
    print(f"measured on: {cpu}")
    for model, m in parse(sys.argv[1]).items():
        tokens, width, depth = SHAPES[model]
        batch = m["batch"]
        full = [r for r in m["rows"] if r["ranks"] == 1][0]
        grad_bytes = full["params_mib"] * 2**20
        # Layouts inside one machine: the measured 1- and 2-rank runs without ZeRO.
        inside = [r for r in m["rows"] if r["ranks"] <= 2 and r["zero"] == 0]
        for net, alpha, beta in NETWORKS:
            print(f"\n{model}: batch {batch} per machine, fp32 gradient {grad_bytes / 1e6:.2f} MB, {net}")
            print(f"{'layout':34s} {'machine samples/s':>17s} " + " ".join(
                f"{'weak@' + str(n):>9s} {'strong@' + str(n):>10s}" for n in MACHINES))
            for r in inside:
                name = "one rank" if r["ranks"] == 1 else (
                    "DP=2" if r["dp"] == 2 else "TP=2" if r["tp"] == 2 else "SP=2")
                t1 = batch / r["rate"]  # compute seconds per machine batch
                cells = []
                for n in MACHINES:
                    comm = allreduce(grad_bytes, n, alpha, beta)
                    weak = t1 / (t1 + comm)
                    # Strong: a global batch of 8 machine batches over n machines.
                    global_time_1 = 8 * t1
                    strong = global_time_1 / (n * (8 * t1 / n + comm))
                    cells.append(f"{100 * weak:8.1f}% {100 * strong:9.1f}%")
                print(f"{'DP across machines, ' + name + ' inside':34s} {r['rate']:17.1f} " + " ".join(cells))
            # Per-layer parallelism stretched over 8 machines (one rank each), compute measured
            # on one machine and divided by 8.
            t1 = batch / full["rate"]
            act = batch * tokens * width * 4  # one block's activations, bytes
            tp_comm = depth * 4 * allreduce(act, 8, alpha, beta)  # f and g, forward and backward
            sp_comm = depth * 2 * (alltoall(3 * act / 8, 8, alpha, beta) + alltoall(act / 8, 8, alpha, beta))
            for name, comm in [("TP=8 across machines", tp_comm), ("SP=8 across machines", sp_comm)]:
                eff = (t1 / 8) / (t1 / 8 + comm)
                print(f"{name:34s} {'':17s} per-step efficiency over 8 machines {100 * eff:5.1f}% "
                      f"(compute {1e3 * t1 / 8:.1f} ms, communication {1e3 * comm:.1f} ms per step)")


if __name__ == "__main__":
    main()
