"""The import rules between the layers, read from the source: the API's core never imports worker
code, the queue and the database modules do not import each other both ways, the models and jobs
domains do not import each other both ways, and the workers' lease and context code holds no SQL
of its own (it lives in `service/jobs/repository.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def importers(folder: str, prefix: str) -> list[str]:
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / folder).rglob("*.py")
        if any(name == prefix or name.startswith(prefix + ".") for name in imports(path))
    )


def test_the_core_imports_no_worker_code() -> None:
    assert importers("service/core", "workers") == []


def test_database_and_queue_modules_do_not_import_each_other() -> None:
    assert not any(name.startswith("service.core.queue") for name in imports(ROOT / "service/core/db.py"))


def test_the_models_domain_does_not_import_the_jobs_domain() -> None:
    assert importers("service/models", "service.jobs") == []


def test_lease_and_context_code_holds_no_sql() -> None:
    for name in ("workers/lease.py", "workers/context.py"):
        used = imports(ROOT / name)
        assert not {"sqlalchemy.select", "sqlalchemy.update", "sqlalchemy.func", "sqlalchemy.delete"} & used, name
