"""The seed script's approach, for the benchmark: what fluxrecipe replaces.

    python benchmarks/seed_baseline.py SCHNELL_DIR KREA_DIR OUT_DIR

Pairs the i-th shard of one source with the i-th of the other, loads both shards whole, averages the keys
they share in bf16 ((a + b) / 2) and keeps the first source's tensor for the others, keeps the whole merged
state dict in memory, and saves it at the end with the first source's shard layout.
"""

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main(schnell: Path, krea: Path, out: Path) -> None:
    shards_a = sorted(schnell.glob("*.safetensors"))
    shards_b = sorted(krea.glob("*.safetensors"))
    merged, layout = {}, {}
    for i, path_a in enumerate(shards_a):
        a = load_file(path_a)
        b = load_file(shards_b[i]) if i < len(shards_b) else {}
        for key, tensor in a.items():
            merged[key] = (tensor + b[key]) / 2 if key in b else tensor
            layout[key] = path_a.name
        del a, b
    out.mkdir(parents=True)
    for name in sorted(set(layout.values())):
        save_file({k: v for k, v in merged.items() if layout[k] == name}, out / name, metadata={"format": "pt"})
    shutil.copy(schnell / "config.json", out / "config.json")
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in merged.values())}, "weight_map": layout}
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    main(*(Path(p) for p in sys.argv[1:4]))
