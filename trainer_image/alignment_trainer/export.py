"""Export a promoted model to object storage: write, verify, then mark complete (objectstore.export).

    python -m alignment_trainer.export SPEC.json      # or the JSON itself (the operator's export Job)

SPEC: {"model": "<dir>", "exports": [{"uri": "s3://bucket/prefix"}], "object_store": {"endpoint_url", "region"},
"termination_message_path": optional}. Credentials: the environment only (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY from a Secret, or the service account's identity). Prints one JSON line
{"event": "exported", ...} per export and ends with {"exports": [...]}: each URI, digest (sha256 of
the file digests), bytes, files, seconds, attempts. Exit 0 all exported; 2 a missing bucket or
refused credentials; 1 the store did not answer after the retries (nothing marked complete).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import outcome
from .objectstore import ObjectStoreError, ObjectStoreUnreachable, export


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return outcome.FIX_INPUT
    spec = json.loads(argv[0] if argv[0].lstrip().startswith("{") else Path(argv[0]).read_text())
    store = spec.get("object_store") or {}
    done = []
    try:
        for e in spec["exports"]:
            result = export(spec["model"], e["uri"], store.get("endpoint_url"), store.get("region"),
                            attempts=int(spec.get("attempts", 3)))
            result["completed"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            done.append(result)
            print(json.dumps({"event": "exported", **result}), flush=True)
    except (ObjectStoreError, ObjectStoreUnreachable) as e:
        failure = outcome.failure(str(e), type(e).__name__, exports=done)
        print(f"error: {failure['error']}", file=sys.stderr, flush=True)
        outcome.write(spec.get("termination_message_path"), failure)
        print(json.dumps(failure), flush=True)
        return failure["exit_code"]
    print(json.dumps({"exports": done}), flush=True)
    outcome.write(spec.get("termination_message_path"), {"exports": done})
    return 0


if __name__ == "__main__":
    sys.exit(main())
