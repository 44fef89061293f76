"""Run history in SQLite, in $PROMPT_IDE_DATA or the user's data folder; survives restarts."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sampler_core.paths import data_dir
from sampler_core.settings import SampleSettings
from sampler_core.tokens import FinishReason, RunSummary, Token, TokenType

from workbench.views import RunResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    output TEXT NOT NULL,
    tokens TEXT NOT NULL,
    prompt_labels TEXT NOT NULL,
    summary TEXT,
    parent_id TEXT,
    branch_index INTEGER,
    forced_ids TEXT NOT NULL,
    image_name TEXT,
    image_sha TEXT,
    image_after INTEGER NOT NULL DEFAULT 0
)
"""
#: Columns added after the first release: (name, declaration) for ALTER TABLE on old files.
ADDED_COLUMNS = (("image_sha", "TEXT"), ("image_after", "INTEGER NOT NULL DEFAULT 0"))
COLUMNS = ("run_id", "created", "model", "source", "prompt", "settings", "seed", "status",
           "error", "output", "tokens", "prompt_labels", "summary", "parent_id", "branch_index",
           "forced_ids", "image_name", "image_sha", "image_after")
IMAGE_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


def _connect(path: Path | None = None) -> sqlite3.Connection:
    path = path or data_dir() / "history.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10)
    conn.execute(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    for name, declaration in ADDED_COLUMNS:
        if name not in have:  # a history file from before images were kept
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {declaration}")
    return conn


def image_dir(path: Path | None = None) -> Path:
    """Where sent images are kept, next to the history file, one file per sha256."""
    return (path.parent if path else data_dir()) / "images"


def put_image(data: bytes, path: Path | None = None) -> str:
    """Keep an image's bytes (content-addressed, written once); returns its sha256."""
    sha = hashlib.sha256(data).hexdigest()
    folder = image_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / sha
    if not target.exists():
        tmp = folder / f".{sha}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(target)  # atomic: a reader never sees half a file
    return sha


def image_path(sha: str, path: Path | None = None) -> Path:
    """The file that holds a kept image (it may be missing)."""
    if not all(c in "0123456789abcdef" for c in sha) or len(sha) != 64:
        raise ValueError(f"image_sha must be 64 hex digits, got {sha!r}")
    return image_dir(path) / sha


def get_image(sha: str | None, path: Path | None = None) -> bytes | None:
    """A kept image's bytes, or None (no image, or the file was removed or altered)."""
    if not sha:
        return None
    try:
        data = image_path(sha, path).read_bytes()
    except (OSError, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def token_from_dict(d: dict[str, Any]) -> Token:
    """Rebuild a Token from ``Token.to_dict()`` output."""
    return Token(token_id=d["token_id"], token_str=d["token_str"], prob=d["prob"],
                 top_k=tuple(token_from_dict(a) for a in d.get("top_k", ())),
                 attn_weights=tuple(d.get("attn_weights", ())),
                 token_type=TokenType(d.get("token_type", 2)), raw_prob=d.get("raw_prob"),
                 logprob=d.get("logprob"), rank=d.get("rank"), entropy=d.get("entropy"),
                 position=d.get("position"))


def summary_to_dict(s: RunSummary | None) -> dict[str, Any] | None:
    """A RunSummary as a JSON-ready dict."""
    if s is None:
        return None
    return {"model_name": s.model_name, "num_prompt_tokens": s.num_prompt_tokens,
            "num_generated_tokens": s.num_generated_tokens, "finish_reason": s.finish_reason.value,
            "stop_match": s.stop_match, "notes": list(s.notes), "prefill": s.prefill,
            "prefill_reused": s.prefill_reused, "prefill_reused_tokens": s.prefill_reused_tokens}


def summary_from_dict(d: dict[str, Any] | None) -> RunSummary | None:
    """Inverse of :func:`summary_to_dict`."""
    if not d:
        return None
    return RunSummary(d["model_name"], d["num_prompt_tokens"], d["num_generated_tokens"],
                      FinishReason(d["finish_reason"]), d.get("stop_match"), tuple(d.get("notes", ())),
                      d.get("prefill", ""), bool(d.get("prefill_reused", False)),
                      int(d.get("prefill_reused_tokens", 0)))


def settings_from_dict(d: dict[str, Any]) -> SampleSettings:
    """SampleSettings from ``to_dict()`` output."""
    return SampleSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def to_dict(run: RunResult) -> dict[str, Any]:
    """A run as JSON-ready data (what the export button downloads)."""
    return {
        "run_id": run.run_id, "created": run.created, "model": run.model, "source": run.source,
        "prompt": run.prompt, "settings": run.settings.to_dict(), "seed": run.settings.rng_seed,
        "status": run.status, "error": run.error, "output": run.text,
        "tokens": [t.to_dict() for t in run.tokens], "prompt_labels": list(run.prompt_labels),
        "summary": summary_to_dict(run.summary), "parent_id": run.parent_id,
        "branch_index": run.branch_index, "forced_ids": list(run.forced_ids),
        "image_name": run.image_name, "image_sha": run.image_sha,
        "image_after": run.image_after,
    }


def from_dict(d: dict[str, Any]) -> RunResult:
    """Inverse of :func:`to_dict` (full per-layer attention is not kept)."""
    return RunResult(
        run_id=d["run_id"], prompt=d["prompt"], settings=settings_from_dict(d["settings"]),
        model=d["model"], tokens=tuple(token_from_dict(t) for t in d["tokens"]),
        prompt_labels=tuple(d.get("prompt_labels", ())), summary=summary_from_dict(d.get("summary")),
        status=d["status"], error=d.get("error"), parent_id=d.get("parent_id"),
        branch_index=d.get("branch_index"), forced_ids=tuple(d.get("forced_ids", ())),
        created=d["created"], image_name=d.get("image_name"), source=d.get("source", "local"),
        image_sha=d.get("image_sha"), image_after=bool(d.get("image_after")))


def to_json(run: RunResult) -> str:
    """A run as pretty JSON."""
    return json.dumps(to_dict(run), indent=2, ensure_ascii=False)


def save(run: RunResult, path: Path | None = None) -> None:
    """Insert or update a run."""
    d = to_dict(run)
    with _connect(path) as conn:
        conn.execute(
            f"INSERT OR REPLACE INTO runs ({','.join(COLUMNS)}) "
            f"VALUES ({','.join('?' * len(COLUMNS))})",
            (d["run_id"], d["created"] or time.time(), d["model"], d["source"], d["prompt"],
             json.dumps(d["settings"]), d["seed"], d["status"], d["error"], d["output"],
             json.dumps(d["tokens"]), json.dumps(d["prompt_labels"]), json.dumps(d["summary"]),
             d["parent_id"], d["branch_index"], json.dumps(d["forced_ids"]), d["image_name"],
             d["image_sha"], int(d["image_after"])))
    # The connection context manager commits; sqlite3 leaves it open, so close it.
    conn.close()


@dataclass(frozen=True)
class HistoryEntry:
    """One line of the history list (without the tokens)."""

    run_id: str
    created: float
    model: str
    prompt: str
    seed: int
    status: str
    output: str
    num_tokens: int
    image_name: str | None = None


def list_runs(limit: int = 200, path: Path | None = None) -> list[HistoryEntry]:
    """The newest runs first."""
    conn = _connect(path)
    try:
        rows = conn.execute(
            "SELECT run_id, created, model, prompt, seed, status, output, json_array_length(tokens), "
            "image_name "
            "FROM runs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
    finally:
        conn.close()
    return [HistoryEntry(*row) for row in rows]


def load(run_id: str, path: Path | None = None) -> RunResult | None:
    """A stored run, or None."""
    conn = _connect(path)
    try:
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        names = [c[0] for c in conn.execute("SELECT * FROM runs LIMIT 0").description]
    finally:
        conn.close()
    if row is None:
        return None
    d = dict(zip(names, row))
    for key in ("settings", "tokens", "prompt_labels", "summary", "forced_ids"):
        d[key] = json.loads(d[key]) if d[key] is not None else None
    return from_dict(d)


class _Code(str):
    """A value whose repr is itself: code spliced into the generated arguments."""

    def __repr__(self) -> str:
        return str(self)


def python_code(run: RunResult, host: str | None = None, path: Path | None = None) -> str:
    """Python (sampler_core client) that reproduces a run (an image is read from its kept copy)."""
    s = run.settings
    inputs: list[Any] = [run.prompt] if run.prompt or not run.image_sha else []
    image_line = ""
    if run.image_sha:
        image_line = (f"# {run.image_name or 'the image'}, as kept with the run\n"
                      f"image = open({str(image_path(run.image_sha, path))!r}, 'rb').read()\n")
        inputs.insert(len(inputs) if run.image_after else 0, _Code("image"))
    if run.forced_ids:
        inputs.append(list(run.forced_ids))
    client = ("SyncClient(Client(api_key=os.environ.get('XAI_API_KEY'), "
              f"api_host={host!r}))" if host else "SyncClient()")
    args = {
        "inputs": inputs, "model_name": run.model, "max_len": s.max_len,
        "temperature": s.temperature, "nucleus_p": s.nucleus_p, "stop_tokens": list(s.stop_tokens),
        "stop_strings": list(s.stop_strings), "rng_seed": s.rng_seed,
        "allowed_tokens": list(s.allowed_tokens), "disallowed_tokens": list(s.disallowed_tokens),
        "augment_tokens": False, "return_attention": s.return_attention, "top_k": s.top_k,
        "full_attention": s.full_attention, "score_prompt": s.score_prompt,
        "stop_at_eos": s.stop_at_eos,
        **({"prefill": s.prefill} if s.prefill else {}),
    }
    body = ",\n".join(f"    {k}={v!r}" for k, v in args.items())
    imports = "import os\n\nfrom sampler_core import Client, SyncClient" if host else \
        "from sampler_core import SyncClient"
    forced = ""
    if run.forced_ids:
        forced = ("# A branch: the second input forces the tokens up to the chosen alternative;\n"
                  "# the sampled continuation follows them.\n")
    return (f"{imports}\n\n{image_line}{forced}client = {client}\ntokens = client.sample(\n{body},\n)\n"
            "print(''.join(t.token_str for t in tokens if t.token_type == 2))\n")
