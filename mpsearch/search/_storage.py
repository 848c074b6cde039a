"""Optuna storages by setup: none (in memory, one call), SQLite (one process, kept), a journal
file (several processes on one machine), PostgreSQL (several machines). Each is opened, and
checked reachable, before any work.

=====================================  ============================================  =========
storage                                for                                           workers
=====================================  ============================================  =========
``None`` (the default of ``search``)   one call: in memory, nothing written           1
``sqlite:///studies/x.db``             one process, kept (the CLI's default)          1
``journal:///abs/path/x.log``,         several processes on one machine               any
``x.log`` / ``x.journal``
``postgresql://user:pw@host:5432/db``  several machines running the same study        any
=====================================  ============================================  =========

Optuna itself advises against SQLite for parallel workers ("database is locked"), so
:func:`make_storage` refuses it when more than one worker is asked for.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import event
from sqlalchemy.pool import StaticPool

from mpsearch._validation import exception_line

JOURNAL_SUFFIXES = (".log", ".journal")
JOURNAL_LOCK_GRACE_S = 5
STORAGE_HELP = (
    "'sqlite:///path/study.db' for one process, 'journal:///path/study.log' (or a path ending "
    "in .log/.journal) for several processes on one machine, or "
    "'postgresql://user:password@host:5432/db' for several machines"
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL + synchronous=NORMAL: a committed trial survives a killed process (only an OS crash
    # can lose the last commits), and each commit costs no fsync of the whole database.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def storage_kind(storage: str | optuna.storages.BaseStorage) -> str:
    """``"sqlite"``, ``"journal"``, ``"rdb"`` (a database server) or ``"object"`` (a storage given as is).

    >>> storage_kind("studies/run.log"), storage_kind("postgresql://db/x")
    ('journal', 'rdb')
    """
    if not isinstance(storage, str):
        if isinstance(storage, optuna.storages.RDBStorage):
            return "sqlite" if storage.engine.dialect.name == "sqlite" else "rdb"
        if isinstance(storage, optuna.storages.JournalStorage):
            return "journal"
        return "object"
    if storage.startswith("journal://") or storage.endswith(JOURNAL_SUFFIXES):
        return "journal"
    if storage.startswith("sqlite:"):
        return "sqlite"
    if re.match(r"^[a-z][a-z0-9+.-]*://", storage):
        return "rdb"
    raise ValueError(
        f"The 'storage' argument must be a storage URL: {STORAGE_HELP}. Got {storage!r} instead."
    )


def safe_url(storage: Any) -> str:
    """A storage URL with its password masked, for messages and logs.

    >>> safe_url("postgresql://me:secret@host/db")
    'postgresql://me:***@host/db'
    """
    if not isinstance(storage, str):
        return type(storage).__name__
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", storage)


def journal_path(storage: str) -> Path:
    """The file behind a journal storage URL (``journal:///abs/x.log``, ``journal://rel.log``, ``x.log``)."""
    if storage.startswith("journal:///"):
        return Path("/" + storage[len("journal:///") :].lstrip("/"))
    if storage.startswith("journal://"):
        return Path(storage[len("journal://") :])
    return Path(storage)


def _writable_file(path: Path, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ValueError(
            f"The {what} storage file {str(path)!r} cannot be created or written "
            f"({type(exc).__name__}: {exc}). Pick a writable folder."
        ) from None
    if not os.access(path, os.W_OK):
        raise ValueError(
            f"The {what} storage file {str(path)!r} is not writable. Pick a writable folder."
        )


def _sqlite(storage: str) -> optuna.storages.BaseStorage:
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        _writable_file(Path(storage[len("sqlite:///") :]), "SQLite")
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    if storage == "sqlite:///:memory:":  # one shared connection, so the lease thread sees the study
        engine_kwargs = {
            "poolclass": StaticPool,
            "connect_args": {"timeout": 30, "check_same_thread": False},
        }
    rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
    if storage == "sqlite:///:memory:":
        return rdb
    event.listen(rdb.engine, "connect", _sqlite_pragmas)
    rdb.engine.dispose()  # reconnect so every pooled connection gets the pragmas
    return rdb


def _journal(storage: str) -> optuna.storages.BaseStorage:
    path = journal_path(storage)
    _writable_file(path, "journal")
    # a worker killed while appending leaves the lock behind: others break it after this grace
    # (Optuna's default, 30 s, would stall every worker that long); an append takes milliseconds
    lock = optuna.storages.journal.JournalFileSymlinkLock(
        str(path), grace_period=JOURNAL_LOCK_GRACE_S
    )
    backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
    return optuna.storages.JournalStorage(backend)


def _postgres_driver(storage: str) -> str:
    """``postgresql://`` names no driver and SQLAlchemy 2.1 then wants psycopg 3: use the one installed."""
    if not storage.startswith("postgresql://"):
        return storage
    for module, scheme in (
        ("psycopg", "postgresql+psycopg://"),
        ("psycopg2", "postgresql+psycopg2://"),
    ):
        if importlib.util.find_spec(module) is not None:
            return scheme + storage[len("postgresql://") :]
    return storage


def _rdb(storage: str) -> optuna.storages.BaseStorage:
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if storage.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        return optuna.storages.RDBStorage(_postgres_driver(storage), engine_kwargs=engine_kwargs)
    except ImportError as exc:
        raise ValueError(
            f"The storage {safe_url(storage)!r} needs a database driver that is not installed "
            f"({exc.__cause__ or exc}); for PostgreSQL: pip install 'mpsearch[postgres]' "
            "(psycopg2-binary)."
        ) from None
    except Exception as exc:  # sqlalchemy.exc.OperationalError and the drivers' own errors
        raise ValueError(
            f"The storage {safe_url(storage)!r} cannot be reached ({exception_line(exc)}). "
            "Check that the server runs, the host, port, user and database are right, and that "
            "this machine may connect to it."
        ) from None


STORAGES: dict[str, Callable[[str], optuna.storages.BaseStorage]] = {
    "sqlite": _sqlite,
    "journal": _journal,
    "rdb": _rdb,
}


def make_storage(
    storage: str | optuna.storages.BaseStorage, *, workers: int = 1
) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL, opened and checked before any trial runs.

    ``sqlite:///...`` (one process), ``journal:///path.log`` or a path ending in ``.log`` /
    ``.journal`` (several processes on one machine), ``postgresql://...`` (several machines),
    or a storage object (returned as is). ``workers`` is how many processes will share it:
    SQLite with more than one is refused, naming the storage to use instead. An unreachable
    server or a file that cannot be written is refused with a :class:`ValueError`.

    >>> make_storage("sqlite:///:memory:").__class__.__name__
    'RDBStorage'
    >>> make_storage("sqlite:///studies/x.db", workers=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...use a journal file...
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(
            f"The 'workers' argument must be a positive integer. Got {workers!r} instead."
        )
    kind = storage_kind(storage)
    if kind == "sqlite" and workers > 1:
        raise ValueError(
            f"SQLite storage ({safe_url(storage)}) cannot serve {workers} parallel workers: "
            "concurrent writers hit 'database is locked'. For several processes on one machine "
            "use a journal file, e.g. storage='journal:///path/study.log' (or 'studies/study.log'); "
            "for several machines use PostgreSQL, e.g. storage='postgresql://user:password@host/db'."
        )
    if not isinstance(storage, str):
        return storage
    return STORAGES[kind](storage)
