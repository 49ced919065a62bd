import json, sys, re
d = json.load(open(sys.argv[1]))
fixed = lambda n: re.fullmatch(r"no-spec|fixed-k\d+", n) is not None
print("| temp | batch | best fixed k (tok/s; its rounds) | best adaptive (tok/s) | ratio, fastest round | ratio, paired | goodput alone |")
print("|---|---|---|---|---|---|---|")
for t in sorted({r["temperature"] for r in d["records"]}):
    for b in sorted({r["batch_size"] for r in d["records"]}):
        rs = [r for r in d["records"] if r["temperature"] == t and r["batch_size"] == b]
        bf = max((r for r in rs if fixed(r["controller"])), key=lambda r: r["tokens_per_s"])
        ada = [r for r in rs if not fixed(r["controller"]) and r["controller"] not in ("oracle", "tree-oracle")]
        ba = max(ada, key=lambda r: r["tokens_per_s"])
        bp = max(ada, key=lambda r: r.get("ratio_paired", 0))
        gp = next(r for r in rs if r["controller"] == "goodput")
        name = lambda r: r["controller"].replace("fixed-", "")
        paired = f"{bp['ratio_paired']:.2f} ({name(bp)})" if "ratio_paired" in bp else "-"
        print(f"| {t} | {b} | {name(bf)}, {bf['tokens_per_s']:.1f} ({' / '.join(f'{x:.1f}' for x in bf['rounds'])}) | "
              f"{name(ba)}, {ba['tokens_per_s']:.1f} | {ba['ratio_best_fixed']:.2f} | {paired} | {gp['ratio_best_fixed']:.2f} |")
