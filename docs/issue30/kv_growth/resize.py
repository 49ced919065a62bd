"""One growth of batch 64's KV (30 layers x [80, 3, 304 -> 324, 64] float32, K and V), timed: zeros then copy
(before 2026-12-05) against uninitialised buffers, the used block copied and the rest zeroed (now).

    python docs/issue30/kv_growth/resize.py
"""
import time, torch, sys
torch.manual_seed(0)
L, B, H, D = 30, 64, 3, 64
bufs = [[torch.randn(B + 16, H, 304, D) for _ in range(2)] for _ in range(L)]
def zeros_copy(old, rows, cols, n, s):
    new = old.new_zeros(rows, old.shape[1], cols, old.shape[3]); new[:n, :, :s] = old[:n, :, :s]; return new
def empty_copy(old, rows, cols, n, s):
    new = old.new_empty(rows, old.shape[1], cols, old.shape[3]); new[:n, :, :s] = old[:n, :, :s]
    new[n:].zero_(); new[:n, :, s:].zero_(); return new
for name, f in [("zeros", zeros_copy), ("empty", empty_copy)] * 3:
    cols = 304
    ts = []
    for rep in range(4):
        t = time.perf_counter()
        for l in range(L):
            bufs[l] = [f(b, B + 16, cols + 20, B, cols) for b in bufs[l]]
        ts.append(time.perf_counter() - t); cols += 20
        for l in range(L):  # back to 304 cols
            bufs[l] = [b[:, :, :304].contiguous() for b in bufs[l]]
        cols = 304
    print(name, " ".join(f"{1000*x:.0f}" for x in ts), "ms")
