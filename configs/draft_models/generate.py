"""Regenerate the draft config.json files here from the target configs in ../targets/.

    python configs/draft_models/generate.py          # rewrite the files
    python configs/draft_models/generate.py --check  # exit 1 if a file differs

Each draft is what llama-eagle3 generates from its target (DraftConfig.from_target), written as the
serving-engine config.json. One documented exception: targets whose RoPE type the draft does not
implement (Kimi-K2.5's yarn) get plain RoPE with the target's rope_theta; the draft is trained from
scratch with that RoPE and the exported config.json says so, so training and serving agree.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from specforge_llama_eagle3.config import ROPE_TYPES, DraftConfig

HERE = Path(__file__).resolve().parent
TARGETS = HERE.parent / "targets"
# draft file -> (target dir, draft_vocab_size)
DRAFTS = {
    "qwen3-8b-eagle3.json": ("Qwen3-8B", 32000),
    "kimi-k2.5-eagle3.json": ("Kimi-K2.5", 32000),
}


def draft_for(target_config: dict, draft_vocab_size: int) -> dict:
    cfg = copy.deepcopy(target_config)
    text = cfg.get("text_config", cfg)
    scaling = text.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ROPE_TYPES:
        text["rope_scaling"] = None  # unsupported rope type: plain RoPE (see module docstring)
    return DraftConfig.from_target(cfg, draft_vocab_size).export_dict()


def render(name: str) -> str:
    target, vocab = DRAFTS[name]
    cfg = json.loads((TARGETS / target / "config.json").read_text())
    return json.dumps(draft_for(cfg, vocab), indent=2) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name in DRAFTS:
        text = render(name)
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python configs/draft_models/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
