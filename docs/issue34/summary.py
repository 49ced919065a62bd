"""Issue 34's ratios from `adactl bench spec --replay` records (docs/issue34/spec_*_replay.json):
per temperature and batch size, the best fixed k, goodput and per-request goodput (goodput-req)
over the best fixed k, the best adaptive stack, SV over standard speculative decoding at the
same k (fixed-k{sv_k},sv / fixed-k{sv_k}), and the three oracles (batch; per request, in hindsight;
per step, looking ahead) over the best fixed k.

    python docs/issue34/summary.py docs/issue34/spec_mixed_replay.json [...]
"""

from __future__ import annotations

import json
import sys

ORACLES = ("oracle", "tree-oracle", "request-oracle", "lookahead-oracle")


def fixed(name: str) -> bool:
    return name == "no-spec" or (name.startswith("fixed-k") and "," not in name)


def summarize(path: str) -> None:
    doc = json.load(open(path))
    records = doc["records"] if isinstance(doc, dict) else doc
    sv_k = (doc.get("meta", {}) if isinstance(doc, dict) else {}).get("args", {}).get("sv_k", 6)
    print(f"## {path}")
    print(
        f"| temperature | batch | best fixed | goodput | goodput-req | best adaptive | SV / fixed-k{sv_k} | oracle | "
        "request-oracle | lookahead-oracle |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(str(r["temperature"]), r["batch_size"]) for r in records})
    for t, b in keys:
        here = {
            r["controller"]: r["tokens_per_s"] for r in records if str(r["temperature"]) == t and r["batch_size"] == b
        }
        best_name = max((n for n in here if fixed(n)), key=here.get)
        best = here[best_name]
        ada = {n: v for n, v in here.items() if not fixed(n) and n not in ORACLES and "tree" not in n}
        top = max(ada, key=ada.get)
        sv = here.get(f"fixed-k{sv_k},sv", float("nan")) / here.get(f"fixed-k{sv_k}", float("nan"))
        print(
            f"| {t} | {b} | {best_name} | {here['goodput'] / best:.3f} "
            f"| {here.get('goodput-req', float('nan')) / best:.3f} "
            f"| {ada[top] / best:.3f} ({top}) | {sv:.2f} | {here.get('oracle', float('nan')) / best:.3f} "
            f"| {here.get('request-oracle', float('nan')) / best:.3f} "
            f"| {here.get('lookahead-oracle', float('nan')) / best:.3f} |"
        )


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarize(p)
