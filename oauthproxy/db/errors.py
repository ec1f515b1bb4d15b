"""Is a database error an outage? Only then is it answered as one (503 with ``Retry-After``).

A database that cannot be reached, is restarting, has no connection slot left or (SQLite) is busy
writing is an outage: retrying shortly helps. Every other database error (a syntax error, a missing table,
a constraint) is a bug and must stay a 500 with its traceback in the log. Django maps drivers' errors onto
its own classes, but not the same way for every database: SQLite reports a syntax error as
``OperationalError``, as PostgreSQL reports a refused connection. So the decision looks at the driver's
error: its SQLSTATE on PostgreSQL, its message on SQLite.
"""

from __future__ import annotations

from django.db import InterfaceError, OperationalError

# SQLSTATE classes and codes of an unreachable PostgreSQL: 08 connection exception; 57P01-57P03 admin or
# crash shutdown, cannot connect now; 53300 too many connections.
_POSTGRESQL_UNREACHABLE = ("08", "57P01", "57P02", "57P03", "53300")
# SQLite's result codes (extended codes start with these): busy or locked by another writer, cannot open the
# file, I/O error; the messages for drivers that do not expose the code.
_SQLITE_UNREACHABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR")
_SQLITE_UNREACHABLE_MESSAGES = ("unable to open database file", "database is locked", "disk i/o error")


def database_unreachable(exc: BaseException) -> bool:
    """True when *exc* says the database cannot be reached (or cannot take the request now)."""
    if isinstance(exc, InterfaceError):
        return True  # the connection is closed or unusable
    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__
    sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if sqlstate is not None:
        return sqlstate.startswith(_POSTGRESQL_UNREACHABLE)
    module = type(cause).__module__ if cause is not None else ""
    if module.startswith("sqlite3"):
        if code := getattr(cause, "sqlite_errorname", ""):
            return code.startswith(_SQLITE_UNREACHABLE)
        return str(cause).lower().startswith(_SQLITE_UNREACHABLE_MESSAGES)
    return True  # no SQLSTATE: the driver failed before the server answered (connecting, connection lost)
