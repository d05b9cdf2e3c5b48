"""Export a promoted model to object storage (write, verify, then mark complete: objectstore.export) or to
the Hugging Face Hub (hf://org/name: one commit, card.push_folder, with HF_TOKEN).

    python -m alignment_trainer.export SPEC.json      # or the JSON itself (the operator's export Job)

SPEC: {"model": "<dir>", "exports": [{"uri": "s3://bucket/prefix"}], "object_store": {"endpoint_url", "region"},
"card": {"from": "<README.md>", "uris": [...]}, "termination_message_path": optional}. Every file of the
model is exported as it is, except its card: README.md is card.from (the eval stage's card of the
promoted model; default the model's own README.md) with the URIs it was exported to (card.uris, default
the exports'; card.export_card), when it is a card of ours. Credentials: the environment only (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY from a Secret, or the service account's identity). Prints one JSON line
{"event": "exported", ...} per export and ends with {"exports": [...]}: each URI, digest (sha256 of
the file digests), bytes, files, seconds, attempts. Exit 0 all exported; 2 a missing bucket or
refused credentials (or a Hub token refused); 1 the store did not answer after the retries (nothing
marked complete), or the Hub push failed otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import outcome
from .card import HubPushFailed, HubPushRefused, export_card, push_folder
from .objectstore import ObjectStoreError, ObjectStoreUnreachable, export, export_files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return outcome.FIX_INPUT
    spec = json.loads(argv[0] if argv[0].lstrip().startswith("{") else Path(argv[0]).read_text())
    store = spec.get("object_store") or {}
    readme = _card(spec, store.get("endpoint_url"))
    done = []
    try:
        for e in spec["exports"]:
            if e["uri"].startswith("hf://"):
                result = _to_hub(Path(spec["model"]), e["uri"], bool(e.get("private", True)), readme)
            else:
                result = export(spec["model"], e["uri"], store.get("endpoint_url"), store.get("region"),
                                attempts=int(spec.get("attempts", 3)),
                                replace={"README.md": readme} if readme else None)
            result["completed"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            done.append(result)
            print(json.dumps({"event": "exported", **result}), flush=True)
    except (ObjectStoreError, ObjectStoreUnreachable, HubPushRefused, HubPushFailed) as e:
        reason = {"HubPushRefused": "RecipeError", "HubPushFailed": "Error"}.get(type(e).__name__, type(e).__name__)
        failure = outcome.failure(str(e), reason, exports=done)
        print(f"error: {failure['error']}", file=sys.stderr, flush=True)
        outcome.write(spec.get("termination_message_path"), failure)
        print(json.dumps(failure), flush=True)
        return failure["exit_code"]
    print(json.dumps({"exports": done}), flush=True)
    outcome.write(spec.get("termination_message_path"), {"exports": done})
    return 0


def _to_hub(model: Path, uri: str, private: bool, readme: bytes | None) -> dict:
    """model to the Hub repository hf://org/name in one commit (card.push_folder: HF_TOKEN), README.md the
    exported card; its result as an object-store export's (the same digest for the same files)."""
    files, total, digest = export_files(model, {"README.md": readme} if readme else None)
    started = time.monotonic()
    repo = uri[len("hf://"):].rstrip("/")
    push_folder(repo, private, model, readme, f"alignment-operator: the promoted model (sha256:{digest[:12]})")
    return {"uri": f"hf://{repo}", "digest": f"sha256:{digest}", "bytes": total, "files": len(files),
            "seconds": round(time.monotonic() - started, 2), "attempts": 1}


def _card(spec: dict, endpoint_url: str | None) -> bytes | None:
    """The exported README.md: the card (card.from, else the model's) with where the model was exported."""
    wanted = (spec.get("card") or {}).get("from")
    source = Path(wanted) if wanted and Path(wanted).is_file() else Path(spec["model"]) / "README.md"
    if not source.is_file():
        return None
    uris = (spec.get("card") or {}).get("uris") or [e["uri"] for e in spec["exports"]]
    text = export_card(source.read_text(), uris, endpoint_url)
    return text.encode() if text is not None else None


if __name__ == "__main__":
    sys.exit(main())
