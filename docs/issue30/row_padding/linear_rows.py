"""torch.nn.functional.linear at 1..N rows (argv[1], default 40) with SmolLM2-135M's shapes: 30 layers of
distinct random weights (streamed from memory, as the model's are) and the output layer, float32, 2 threads,
row counts interleaved; medians (ms) of 6 passes.

    python docs/issue30/row_padding/linear_rows.py 40
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
H, FF, KV, V, L = 576, 1536, 192, 49152, 30
layers = [
    [torch.randn(o, i) * 0.02 for (o, i) in [(H, H), (KV, H), (KV, H), (H, H), (FF, H), (FF, H), (H, FF)]]
    for _ in range(L)
]
head = torch.randn(V, H) * 0.02
Ms = list(range(1, int(sys.argv[1]) + 1)) if len(sys.argv) > 1 else list(range(1, 41))
res = {m: [] for m in Ms}
resh = {m: [] for m in Ms}
with torch.inference_mode():
    for rep in range(7):
        for m in Ms if rep % 2 == 0 else Ms[::-1]:
            x = torch.randn(m, H)
            xi = torch.randn(m, FF)
            t0 = time.perf_counter()
            for layer in layers:
                for w in layer:
                    F.linear(xi if w.shape[1] == FF else x, w)
            t1 = time.perf_counter()
            F.linear(x, head)
            t2 = time.perf_counter()
            if rep >= 1:
                res[m].append(1000 * (t1 - t0))
                resh[m].append(1000 * (t2 - t1))
for m in Ms:
    print(f"M={m:2d} body {statistics.median(res[m]):6.1f}  head {statistics.median(resh[m]):5.1f}")
