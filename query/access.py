"""Row-level access for limited tokens: a query sees only the samples of its scope.

DuckDB has no row-level security, so a limited query runs on a cursor of its own where a
temporary view shadows every table and view of the profile database with a filtered one.
Unqualified names, the documented views and the table macros all resolve to the temporary
views first; what could reach past them (a name qualified with the database's catalog,
query()/query_table() with a name in a string, file readers) is refused before it runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import duckdb

from fleetprof.proto.security import AccessScope
from fleetprof.query.filters import sql_literal
from fleetprof.query.sandbox import QueryError

# Table functions a limited query may call besides the profile macros.
_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})


def limited_to(scope: AccessScope | None) -> Callable[[duckdb.DuckDBPyConnection, str], None]:
    """run_query's `prepare` for a token's scope (None: no limit)."""

    def prepare(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
        if scope is not None:
            check_scoped(cursor, sql)
            restrict(cursor, scope)

    return prepare


def restrict(cursor: duckdb.DuckDBPyConnection, scope: AccessScope) -> None:
    """Shadow every relation of the database with a view of what `scope` may see."""
    catalog = cursor.execute("SELECT current_database()").fetchone()[0]
    relations = cursor.execute(
        """
        SELECT table_name, list(column_name) FROM information_schema.columns
        WHERE table_catalog = current_database() AND table_schema = 'main'
        GROUP BY table_name
        """
    ).fetchall()
    # Relations with a job column first: the others are filtered through `samples` (live
    # and sealed rows) or `label_sets`, which must exist when they are defined.
    relations.sort(key=lambda relation: "job" not in relation[1])
    for name, columns in relations:
        source = f'"{catalog}".main."{name}"'
        where = _row_filter(scope, columns)
        cursor.execute(f'CREATE TEMP VIEW "{name}" AS SELECT * FROM {source} WHERE {where}')


def _row_filter(scope: AccessScope, columns: list[str]) -> str:
    if "job" in columns:
        allowed = f"list_contains({_list(scope.jobs)}, job)"
        if "namespace" in columns:
            allowed += f" OR list_contains({_list(scope.namespaces)}, namespace)"
        return f"({allowed})"
    # Sample rows: those of the scope's label sets (label_sets has a job column).
    if "label_set" in columns:
        return "label_set IN (SELECT label_set FROM temp.main.label_sets)"
    # Stacks and per-process rows: only those the scope's samples refer to.
    if "stack_id" in columns:
        return "stack_id IN (SELECT stack_id FROM temp.main.samples)"
    if {"node", "pid"} <= set(columns):
        return "(node, pid) IN (SELECT node, pid FROM temp.main.samples)"
    return "false"  # bookkeeping (ingested batches, ...): nothing of it


def _list(values: frozenset[str]) -> str:
    return f"[{', '.join(sql_literal(v) for v in sorted(values))}]::VARCHAR[]"


def check_scoped(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse what could read past the temporary views of `restrict`."""
    catalog = cursor.execute("SELECT current_database()").fetchone()[0].lower()
    try:
        tree = json.loads(
            cursor.execute("SELECT json_serialize_sql($sql)", {"sql": sql}).fetchone()[0]
        )
    except duckdb.Error as exc:
        raise QueryError(f"cannot check this query for a limited token: {exc}") from exc
    if tree.get("error"):
        raise QueryError(tree.get("error_message", "this query cannot be checked"))
    macros = {
        row[0]
        for row in cursor.execute(
            "SELECT function_name FROM duckdb_functions() "
            "WHERE function_type = 'table_macro' AND database_name = current_database()"
        ).fetchall()
    }
    for node in _nodes(tree):
        # Relations name it in catalog_name (or schema_name, `db.table`); functions in catalog.
        qualifiers = (node.get(key) for key in ("catalog_name", "schema_name", "catalog", "schema"))
        if catalog in (str(q).lower() for q in qualifiers if q):
            raise QueryError("refused: this token may not name the database's catalog")
        if node.get("type") == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
            function = node["function"].get("function_name")
            if function not in macros and function not in _TABLE_FUNCTIONS:
                raise QueryError(f"refused: this token may not call {function}()")
        elif node.get("function_name") in ("query", "query_table"):
            raise QueryError(f"refused: this token may not call {node['function_name']}()")


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _nodes(child)
    elif isinstance(value, list):
        for child in value:
            yield from _nodes(child)
