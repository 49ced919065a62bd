"""A model directory with the shape, tokenizer and config of another but random weights (bf16).

On a GPU machine that cannot download the default target, `adactl bench runtime --target DIR`
then times the real SmolLM2-135M shape with its real tokenizer: plain decoding costs the same
whatever the weights (acceptance of a draft does not, so drafted rows are not meaningful).

    python docs/gpu/random_like.py SOURCE_DIR OUT_DIR   # SOURCE_DIR: config.json and tokenizer files
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
    model.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
