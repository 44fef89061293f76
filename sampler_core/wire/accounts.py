"""API keys, token budgets and transactions, persisted in SQLite so a restart loses nothing.

Without a key file every caller is one anonymous account. Keys are never stored: an account is
named by the key file (``KEY NAME``) or by a hash of the key. Budgets are enforced with
reservations: a request reserves its prompt plus ``max_len`` tokens before it runs and the
actual spend is recorded when it ends, so concurrent requests cannot overshoot the limit.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from sampler_core.errors import BudgetExceeded, Unauthenticated

ANONYMOUS = "anonymous"
#: int32 fields on the wire: "no limit" travels as the largest value.
UNLIMITED = 2**31 - 1


@dataclass(frozen=True)
class TokenBudget:
    """An account's limits and what it has spent (the wire's TokenBudget)."""

    token_limit: int
    tokens_spent: int
    request_limit: int
    requests_spent: int


@dataclass(frozen=True)
class Transaction:
    """One recorded request (the wire's TokenTransaction)."""

    transaction_id: str
    transaction_type: str
    model_name: str
    num_prompt_tokens: int
    num_generated_tokens: int
    create_time: datetime
    cost_multiplier: int = 1
    confirmed: bool = True


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_file(path: Path) -> dict[str, str]:
    """``{sha256(key): account}`` from a file of ``KEY [NAME]`` lines (``#`` comments)."""
    keys: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, name = line.partition(" ")
        keys[_hash(key)] = name.strip() or f"key-{_hash(key)[:12]}"
    if not keys:
        raise ValueError(f"{path} holds no API keys (one 'KEY [NAME]' per line)")
    return keys


class Accounts:
    """Authentication, budgets and the transaction log of one server."""

    def __init__(self, data_dir: Path, keys: dict[str, str] | None = None, *,
                 token_limit: int | None = None, request_limit: int | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "accounts.sqlite3"
        self.keys = keys
        self.token_limit = token_limit
        self.request_limit = request_limit
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS transactions (id TEXT PRIMARY KEY, account TEXT NOT NULL,"
            " create_time REAL NOT NULL, transaction_type TEXT NOT NULL, model_name TEXT NOT NULL,"
            " num_prompt_tokens INTEGER NOT NULL, num_generated_tokens INTEGER NOT NULL,"
            " cost_multiplier INTEGER NOT NULL, confirmed INTEGER NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_account ON transactions (account, create_time)")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # ----- who is calling ------------------------------------------------------------------------

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The account of a call's ``apikey`` metadata; Unauthenticated when missing or wrong."""
        if self.keys is None:
            return ANONYMOUS
        key = next((v for k, v in metadata if k == "apikey"), None)
        if isinstance(key, bytes):
            key = key.decode(errors="replace")
        if not key:
            raise Unauthenticated("missing API key: send it as gRPC metadata 'apikey: <key>'")
        account = self.keys.get(_hash(key))
        if account is None:
            raise Unauthenticated("invalid API key (not in the server's key file)")
        return account

    # ----- budgets -------------------------------------------------------------------------------

    def _spent(self, account: str, transaction_type: str = "") -> tuple[int, int]:
        query = ("SELECT COALESCE(SUM((num_prompt_tokens + num_generated_tokens) * cost_multiplier),"
                 " 0), COUNT(*) FROM transactions WHERE account = ?")
        args: tuple[str, ...] = (account,)
        if transaction_type:
            query += " AND transaction_type = ?"
            args += (transaction_type,)
        tokens, requests = self._db.execute(query, args).fetchone()
        return int(tokens), int(requests)

    def budget(self, account: str, transaction_type: str = "") -> TokenBudget:
        """Limits and spend (optionally of one transaction type only)."""
        with self._lock:
            tokens, requests = self._spent(account, transaction_type)
        clamp = lambda n: min(n, UNLIMITED)  # noqa: E731
        return TokenBudget(
            token_limit=clamp(self.token_limit if self.token_limit is not None else UNLIMITED),
            tokens_spent=clamp(tokens),
            request_limit=clamp(self.request_limit if self.request_limit is not None else UNLIMITED),
            requests_spent=clamp(requests))

    def reserve(self, account: str, prompt_tokens: int, max_len: int) -> int:
        """Reserve a request's worst-case spend; BudgetExceeded (numbers in the message) if it
        would pass a limit. Returns the reserved amount for :meth:`record`."""
        need = prompt_tokens + max_len
        with self._lock:
            tokens, requests = self._spent(account)
            reserved = self._reserved.get(account, 0)
            running = self._running.get(account, 0)
            if self.request_limit is not None and requests + running + 1 > self.request_limit:
                raise BudgetExceeded(
                    f"request budget exceeded: {requests} requests spent and {running} running "
                    f"of a limit of {self.request_limit}")
            if self.token_limit is not None and tokens + reserved + need > self.token_limit:
                raise BudgetExceeded(
                    f"token budget exceeded: {tokens} tokens spent and {reserved} reserved of a "
                    f"limit of {self.token_limit}; this request needs up to {need} "
                    f"({prompt_tokens} prompt + {max_len} max_len)")
            self._reserved[account] = reserved + need
            self._running[account] = running + 1
        return need

    def record(self, account: str, reserved: int, *, transaction_type: str, model_name: str,
               num_prompt_tokens: int, num_generated_tokens: int,
               confirmed: bool = True) -> Transaction:
        """Release a reservation and log what the request actually spent."""
        now = time.time()
        tx = Transaction(transaction_id=uuid.uuid4().hex, transaction_type=transaction_type,
                         model_name=model_name, num_prompt_tokens=num_prompt_tokens,
                         num_generated_tokens=num_generated_tokens,
                         create_time=datetime.fromtimestamp(now, timezone.utc), confirmed=confirmed)
        with self._lock:
            self._reserved[account] = self._reserved.get(account, 0) - reserved
            self._running[account] = self._running.get(account, 0) - 1
            self._db.execute(
                "INSERT INTO transactions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tx.transaction_id, account, now, transaction_type, model_name,
                 num_prompt_tokens, num_generated_tokens, tx.cost_multiplier, int(confirmed)))
        return tx

    def release(self, account: str, reserved: int) -> None:
        """Drop a reservation of a request that never ran."""
        with self._lock:
            self._reserved[account] = self._reserved.get(account, 0) - reserved
            self._running[account] = self._running.get(account, 0) - 1

    def transactions(self, account: str, limit: int = 1000) -> list[Transaction]:
        """The account's most recent transactions, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, transaction_type, model_name, num_prompt_tokens, num_generated_tokens,"
                " create_time, cost_multiplier, confirmed FROM transactions WHERE account = ?"
                " ORDER BY create_time DESC LIMIT ?", (account, limit)).fetchall()
        return [Transaction(r[0], r[1], r[2], r[3], r[4], datetime.fromtimestamp(r[5], timezone.utc),
                            r[6], bool(r[7])) for r in reversed(rows)]
