"""Which steps of the fastest round each adaptive run drafted on (`--validate`'s step log).

    python docs/issue30/probe_seed/drafted_steps.py docs/issue30/probe_seed/before_steps.json
"""

import json
import sys

for r in json.load(open(sys.argv[1]))["records"]:
    drafted = [i for i, s in enumerate(r["steps"]) if s.get("draft_tokens", 0) or s.get("max_draft", 0)]
    print(f"{r['controller']:12s} {len(r['steps'])} steps, drafted on step {drafted or 'none'} (0 is the prefill)")
