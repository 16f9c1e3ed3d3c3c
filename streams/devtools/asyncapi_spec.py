"""The official AsyncAPI 3.0.0 JSON Schema, fetched once from its published npm package.

The AsyncAPI initiative publishes the JSON Schemas of its specification as
the npm package ``@asyncapi/specs``; its ``schemas/3.0.0.json`` is the
bundled schema their own parser validates documents with.  The tests
validate paystream's generated document against that file (with
``jsonschema``), never against a copy written here.  Like Kafka's jars
(:mod:`streams.devtools.localkafka`) the package is fetched on first use
with the machine's own client (``npm pack``, which checks the tarball
against the registry's integrity hash) into ``~/.cache/paystream`` and
reused afterwards.  Dev tooling: the runtime never needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = "@asyncapi/specs"
#: Pinned: a new release may change what validates.
VERSION = "6.11.1"
#: The schema inside the package.
SCHEMA_FILE = "schemas/3.0.0.json"


class SpecUnavailable(RuntimeError):
    """The schema package could not be fetched (npm missing or the fetch failed)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "paystream" / f"asyncapi-specs-{VERSION}"


def schema_path(cache_dir: Path | None = None) -> Path:
    """Path of the AsyncAPI 3.0.0 JSON Schema, fetching the package on first use."""
    cache = cache_dir or default_cache_dir()
    target = cache / "package" / SCHEMA_FILE
    marker = cache / ".complete"
    if marker.exists() and target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise SpecUnavailable(f"npm is missing: install Node.js and npm (Debian: `apt-get install -y "
                              f"npm`) to fetch {PACKAGE}@{VERSION}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        result = subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", scratch, "--silent"],
            capture_output=True, text=True, check=False, timeout=300, cwd=scratch)
        tarballs = list(Path(scratch).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise SpecUnavailable(f"npm pack {PACKAGE}@{VERSION} failed ({result.returncode}): "
                                  f"{(result.stderr or result.stdout)[-2000:]}")
        if (cache / "package").exists():
            shutil.rmtree(cache / "package")
        with tarfile.open(tarballs[0]) as archive:
            archive.extractall(cache, filter="data")
    if not target.exists():
        raise SpecUnavailable(f"{PACKAGE}@{VERSION} has no {SCHEMA_FILE}")
    marker.write_text(VERSION + "\n")
    return target


def load_schema(cache_dir: Path | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 JSON Schema as a dict."""
    schema: dict[str, Any] = json.loads(schema_path(cache_dir).read_text(encoding="utf-8"))
    return schema
