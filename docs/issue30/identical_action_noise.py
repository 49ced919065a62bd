"""How far `make bench` measures one action from itself: every cell of the saved runs where an
adaptive stack drafted nothing at all (plain decoding, the same action as `no-spec`), its tokens/s
over `no-spec`'s, by fastest round and paired within rounds.

    python docs/issue30/identical_action_noise.py
"""

import glob
import json
import statistics


def main() -> None:
    fastest, paired = [], []
    for path in sorted(glob.glob("docs/issue30/make_bench_run*/spec.json")):
        records = json.load(open(path))["records"]
        for r in records:
            if r["controller"] == "no-spec" or "fixed" in r["controller"] or "oracle" in r["controller"]:
                continue
            if r.get("mean_draft_len", 1.0) != 0.0:
                continue
            plain = next((x for x in records if x["controller"] == "no-spec" and x["temperature"] == r["temperature"]
                          and x["batch_size"] == r["batch_size"]), None)  # fmt: skip
            if plain is None:
                continue
            fastest.append(r["tokens_per_s"] / plain["tokens_per_s"])
            if r.get("round_ratios"):
                paired.append(statistics.median(r["round_ratios"]))
            print(
                f"{path.split('/')[2]:18} t={r['temperature']} b={r['batch_size']:2} {r['controller']:12} "
                f"fastest {fastest[-1]:.3f}" + (f" paired {paired[-1]:.3f}" if r.get("round_ratios") else "")
            )
    for name, xs in (("fastest round", fastest), ("paired", paired)):
        under = sum(x < 0.97 for x in xs)
        print(
            f"{name}: {len(xs)} cells, mean {statistics.mean(xs):.3f}, sd {statistics.pstdev(xs):.3f}, "
            f"range {min(xs):.3f}-{max(xs):.3f}, under 0.97: {under}"
        )


if __name__ == "__main__":
    main()
