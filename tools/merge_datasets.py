"""Concatenate several Megatron .bin/.idx datasets into one (megatron-core's builder `add_index`).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

Each --input is a prefix (path without .bin/.idx) or a folder (all prefixes in it, sorted by name).
Documents keep their order: all of the first input, then the second, and so on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from neox.config import ConfigError  # noqa: E402
from neox.data.indexed import merge_indexed_datasets  # noqa: E402


def expand(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p.with_suffix("")) for p in Path(item).glob("*.idx"))
            if not found:
                raise ConfigError(f"--input: folder {item!r} holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or folders, in merge order")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    try:
        prefixes = expand(args.input)
        out = args.output_prefix
        existing = [f"{out}{e}" for e in (".bin", ".idx") if os.path.exists(f"{out}{e}")]
        if existing and not args.overwrite:
            raise ConfigError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it")
        if os.path.abspath(out) in {os.path.abspath(q) for q in prefixes}:
            raise ConfigError(f"--output-prefix {out!r} is also an input; choose another name")
        info = merge_indexed_datasets(prefixes, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(prefixes)} datasets -> {out}.bin/.idx: {info.num_documents:,} documents, "
          f"{info.num_tokens:,} tokens ({info.dtype.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
