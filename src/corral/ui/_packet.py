"""The evidence packet: one sandbox's record, in a zip a reviewer can check without corral's store.

events.jsonl       the events, one per line, byte for byte the text that was hashed into the chain
proof.json         the chain proof (`Store.proof`): each event's prev and hash, and the host-chain
                   entries, signed, that carry the sandbox's head
verification.json  what `corral audit verify` found for this sandbox when the packet was made
report.html        the sandbox's report, readable offline (no script, no external resource)
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import IO

from corral import report
from corral.store import Filters, SandboxInfo, Store, StoredEvent, verify

CHUNK = 1 << 16


def build(store: Store, info: SandboxInfo) -> IO[bytes]:
    """The packet, in a temporary file (a sandbox's events may not fit in memory), at position 0."""
    out = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 - the caller closes it
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("events.jsonl", "w") as f:
            # The stored text, not the parsed events re-serialised: the proof's hashes are over it.
            for (body,) in store.raw("SELECT body FROM events WHERE sandbox = ? ORDER BY seq", (info.id,)):
                f.write(body.encode() + b"\n")
        z.writestr("proof.json", json.dumps(store.proof(info.id), indent=1))
        z.writestr("verification.json", json.dumps(_verification(store, info.id), indent=1))
        events = store.events(Filters(sandbox=info.id))
        z.writestr("report.html", _report_html(info, events))
    out.seek(0)
    return out


def chunks(f: IO[bytes]) -> Iterator[bytes]:
    try:
        while block := f.read(CHUNK):
            yield block
    finally:
        f.close()


def _verification(store: Store, sandbox: str) -> dict[str, object]:
    result = verify(store, sandbox=sandbox)
    return {
        "sandbox": sandbox,
        "checked": datetime.now(UTC).isoformat(),
        "intact": result.ok,
        "events": result.events,
        "commits": result.commits,
        "checkpoints": result.checkpoints,
        "findings": [asdict(f) | {"tampered": f.tampered} for f in result.findings],
    }


def _report_html(sandbox: SandboxInfo, events: Iterable[StoredEvent]) -> str:
    """The report `corral report SANDBOX --format html` writes: one file, no script, nothing
    external."""
    return report.to_html(report.build([sandbox], events))
