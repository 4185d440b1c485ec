#!/usr/bin/env python
"""Write ONNX Runtime decode graphs into an engine exported without them (before they existed, or with
`--decode-graphs off`), as `star-export --decode-graphs on` would have, and rewrite its star.json (file table included).

For measuring an existing full-size engine without re-exporting it (an hour for a 7B): the decode graphs share the
segments' weight files, so this takes minutes and no disk beyond two small graphs. The engine is checked first (every
sha256), so a damaged engine is not re-signed. Validate the result with `star-validate`.

    python scripts/add_decode_graphs.py ENGINE_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from star_export.export.build import Progress, decode_graph_entries
from star_export.export.decode_graphs import decode_graph_names
from star_export.manifest import MANIFEST, file_table, read_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine")
    a = p.parse_args(argv)
    directory = Path(a.engine)
    manifest = read_manifest(directory, verify=True)
    if decode_graph_names(manifest["graphs"]):
        print(f"{directory} already has decode graphs", file=sys.stderr)
        return 0
    entries = decode_graph_entries(directory, manifest, Progress(1))
    if not entries:
        return 1
    manifest["graphs"] |= entries
    manifest["files"] = file_table(directory)
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)
    print(f"decode graphs written into {directory}: {', '.join(entries)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
