"""Optuna storages: SQLite tuned for many small commits, and the others by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import event


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL + synchronous=NORMAL: a committed trial survives a killed process (only an OS crash
    # can lose the last commits), and each commit costs no fsync of the whole database.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_storage(storage: str | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL (``sqlite:///...``, ``postgresql://...``) or a storage object.

    >>> make_storage("sqlite:///:memory:").__class__.__name__
    'RDBStorage'
    """
    if not isinstance(storage, str):
        return storage
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if storage.startswith("sqlite:"):
        engine_kwargs = {"connect_args": {"timeout": 30}}
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
        event.listen(rdb.engine, "connect", _sqlite_pragmas)
        rdb.engine.dispose()  # reconnect so every pooled connection gets the pragmas
        return rdb
    return optuna.storages.RDBStorage(storage)
