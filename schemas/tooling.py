"""``paystream schemas register|check``: the contracts against a registry.

``check`` is the gate that keeps a breaking contract change out: it asks the
registry whether each ``.avsc`` is compatible with what the subject already
holds (under the subject's compatibility level), and exits non-zero if any is
not.  ``baseline_from_git`` feeds a registry every committed version of each
contract, so CI can run the same gate on a fresh machine with an empty registry.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from schemas import contracts
from streams import catalog
from streams.access import registry_client_config

SUBJECT_NOT_FOUND = 40401


@dataclass(frozen=True)
class CheckResult:
    topic: str
    subject: str
    compatible: bool
    detail: str


def _client(registry: SchemaRegistryClient | str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry}) if isinstance(registry, str) else registry


def register_contracts(
    registry: SchemaRegistryClient | str, topics: Iterable[str] | None = None, prefix: str = ""
) -> dict[str, int]:
    """Register each contract under ``<prefix><topic>-value``; return subject -> id."""
    client = _client(registry)
    ids: dict[str, int] = {}
    for topic in topics or contracts.contract_names():
        subject = catalog.value_subject(f"{prefix}{topic}")
        ids[subject] = client.register_schema(subject, Schema(contracts.schema_text(topic), "AVRO"))
    return ids


def check_contracts(
    registry: SchemaRegistryClient | str,
    topics: Iterable[str] | None = None,
    prefix: str = "",
    texts: dict[str, str] | None = None,
) -> list[CheckResult]:
    """Test every contract (or the given ``texts``) against the registry's subjects."""
    client = _client(registry)
    results = []
    for topic in topics or contracts.contract_names():
        subject = catalog.value_subject(f"{prefix}{topic}")
        text = (texts or {}).get(topic) or contracts.schema_text(topic)
        try:
            compatible = client.test_compatibility_all_versions(subject, Schema(text, "AVRO"), verbose=True)
        except SchemaRegistryError as exc:
            if exc.error_code == SUBJECT_NOT_FOUND:
                results.append(CheckResult(topic, subject, True, "new subject"))
                continue
            results.append(CheckResult(topic, subject, False, f"registry error: {exc}"))
            continue
        detail = "compatible" if compatible else "INCOMPATIBLE with the registered versions"
        results.append(CheckResult(topic, subject, bool(compatible), detail))
    return results


def baseline_from_git(
    registry: SchemaRegistryClient | str, *, prefix: str = "", repo: Path | None = None,
    until: str = "HEAD",
) -> int:
    """Register every committed version of every contract, oldest first.

    Returns how many versions were registered.  A version that a later commit
    already broke is reported by the registry at the time it is registered,
    so the history itself is checked too.
    """
    client = _client(registry)
    root = repo or Path(__file__).resolve().parent.parent
    count = 0
    for topic in contracts.contract_names():
        path = f"{contracts.SOURCE_DIR}/{topic}{contracts.SUFFIX}"
        subject = catalog.value_subject(f"{prefix}{topic}")
        for text in committed_versions(root, path, until):
            client.register_schema(subject, Schema(text, "AVRO"))
            count += 1
    return count


def committed_versions(root: Path, path: str, until: str = "HEAD") -> list[str]:
    """The texts ``path`` had in each commit that changed it, oldest first."""
    log = subprocess.run(
        ["git", "-C", str(root), "log", "--format=%H", "--reverse", until, "--", path],
        capture_output=True, text=True, check=False,
    )
    if log.returncode != 0:
        return []
    texts = []
    for commit in log.stdout.split():
        shown = subprocess.run(
            ["git", "-C", str(root), "show", f"{commit}:{path}"],
            capture_output=True, text=True, check=False,
        )
        if shown.returncode == 0 and shown.stdout.strip():
            texts.append(shown.stdout)
    return texts


def register_all(url: str, token: str | None = None) -> int:
    """CLI: register every contract; print subject and id.

    ``token``: the service token a registry with ``PAYSTREAM_SERVICE_TOKENS``
    asks of writes (streams.access).
    """
    try:
        ids = register_contracts(SchemaRegistryClient({"url": url, **registry_client_config(token)}))
    except SchemaRegistryError as exc:
        print(f"schemas: registration failed: {exc}", file=sys.stderr)
        return 1
    for subject, schema_id in sorted(ids.items()):
        print(f"{subject}\tid {schema_id}")
    print(f"schemas: {len(ids)} contracts registered at {url}")
    return 0


def check_all(url: str) -> int:
    """CLI: exit 1 when any contract breaks its subject's compatibility."""
    results = check_contracts(url)
    for result in results:
        mark = "ok  " if result.compatible else "FAIL"
        print(f"{mark} {result.subject}: {result.detail}")
    broken = [r for r in results if not r.compatible]
    print(f"schemas: {len(results) - len(broken)} compatible, {len(broken)} breaking")
    return 1 if broken else 0
