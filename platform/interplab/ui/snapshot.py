"""One request's view of the store: its runs listed once, its SQL through the store's sandbox.

:meth:`Store.sql` lists the store's runs before every query, so that each query sees the committed
runs of that moment. A page runs several queries; a :class:`Snapshot` lists the runs once per page
and runs every query of the page in the same locked :class:`~interplab.store.query.Session` (the
store's own sandbox: statement check, no file access, locked configuration). The session is kept
between pages while the store's runs do not change.

Stores that are not a local or S3 :class:`~interplab.store.Store` (a catalog over several stores)
are used as they are, through their own ``sql``/``views``/``saved``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from interplab.store import Store
from interplab.store.manifest import RunInfo
from interplab.store.query import Session
from interplab.store.sqlfiles import saved_query


class SessionCache:
    """The last session built, and the runs it covers (run id, status, commit time)."""

    def __init__(self) -> None:
        self.key: tuple[tuple[str, str, str | None], ...] | None = None
        self.session: Session | None = None

    def get(self, store: Store, runs: list[RunInfo]) -> Session:
        key = tuple((r.run_id, r.status, r.committed_at) for r in runs)
        if self.session is None or key != self.key:
            self.close()
            self.session = Session(store.location, runs)
            self.key = key
        return self.session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class Snapshot:
    """The store as one page sees it (duck-types the reading half of :class:`Store`)."""

    def __init__(self, store: Store, cache: SessionCache) -> None:
        self.store = store
        self.location = store.location
        self.uri = store.uri
        self._runs = store.runs()
        self._session = cache.get(store, self._runs)

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pa.Table:
        return self._session.execute(query, params)

    def saved(self, name: str, **params: Any) -> pa.Table:
        query = saved_query(name)
        return self.sql(query.sql, query.bind(params) or None)

    def views(self) -> list[str]:
        return list(self._session.views)

    def runs(self, status: str | None = None) -> list[RunInfo]:
        return [r for r in self._runs if status is None or r.status == status]

    def run(self, run_id: str) -> RunInfo:
        for info in self._runs:
            if info.run_id == run_id:
                return info
        return self.store.run(run_id)  # StoreError naming the store when there is no such run


def snapshot(store: Any, cache: SessionCache) -> Any:
    """A :class:`Snapshot` of a :class:`Store`; any other store-like object as it is."""
    return Snapshot(store, cache) if isinstance(store, Store) else store
