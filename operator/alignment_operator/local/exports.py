"""The local shell's promote.exports: once promote decided (status.promotion Promoted), the promoted
model is exported by the trainer's own tool (`python -m alignment_trainer.export`, a child process:
objectstore.export writes, verifies, then marks complete, retrying a store that does not answer).
The exported README.md is the card the eval that chose the model wrote, listing every promote.exports
URI. Each result (URI, digest, bytes, time, attempts) or error goes to status.promotion.exports; the pure
promotion.apply words the Exported condition from them. Credentials: this environment's AWS_* (as
the pods get spec.objectStore.credentialsSecretName's) and, for hf://, huggingface_hub's token
(HF_TOKEN or your login); never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..api import AlignmentRun
from ..api.status import ExportResult
from ..promotion import pending_exports
from ..render.exporting import export_spec


def export_promoted(run: AlignmentRun, run_dir: Path, echo=print) -> bool:
    """Export what is pending; True when something was tried (the caller reconciles and writes status)."""
    p = run.status.promotion if run.status else None
    pending = pending_exports(run, p)
    if not pending or not p.model:
        return False
    spec = export_spec(run, p.model, pending, str(run_dir / p.evaluated_by) if p.evaluated_by else None)
    spec_path = run_dir / "export.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    echo(f"exporting {p.stage} ({p.model}) to {', '.join(pending)} ...")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer.export", str(spec_path)], env=env,
                          capture_output=True, text=True)
    (run_dir / "export.log").write_text(proc.stdout + proc.stderr)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [ExportResult.model_validate({k: v for k, v in r.items() if k != "event"}) for r in lines
               if r.get("event") == "exported"]
    if proc.returncode != 0:
        failure = next((r for r in lines if "error" in r), None)
        error = failure["error"] if failure else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        done = {r.uri.rstrip("/") for r in results}
        results += [ExportResult(uri=u, error=error) for u in pending if u.rstrip("/") not in done]
    keep = [e for e in p.exports if e.uri.rstrip("/") not in {r.uri.rstrip("/") for r in results}]
    p.exports = keep + results
    for r in results:
        echo(f"  {r.uri}: " + (f"{r.digest}, {r.bytes} bytes, {r.files} files, {r.seconds} s, {r.attempts} tries"
                                if not r.error else f"FAILED: {r.error}"))
    return True
