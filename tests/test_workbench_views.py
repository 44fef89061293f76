"""The workbench's plain logic (no Streamlit, no model): view models, forms, history store, images."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from sampler_core.errors import InvalidSettings
from sampler_core.settings import SampleSettings
from sampler_core.tokens import AttentionDetail, FinishReason, RunSummary, Token, TokenType
from workbench import forms, images, store, views


def tok(i: int, text: str, prob: float, *, user: bool = False, attn: int = 0,
        alts: tuple[Token, ...] = (), detail: np.ndarray | None = None) -> Token:
    return Token(token_id=i, token_str=text, prob=prob, top_k=alts,
                 attn_weights=tuple(np.full(attn, 1.0 / attn)) if attn else (),
                 token_type=TokenType.USER if user else TokenType.MODEL, raw_prob=prob,
                 logprob=float(np.log(prob)) if prob > 0 else None, rank=1, entropy=0.5,
                 position=i, attention=AttentionDetail(detail) if detail is not None else None)


def test_visible_whitespace_and_bands() -> None:
    assert views.visible(" a\tb\n") == "·a→b↵"
    assert views.visible("") == "∅"
    assert [views.band(p) for p in (0.95, 0.6, 0.3, 0.1, 0.01, None)] == [0, 1, 2, 3, 4, 4]


def test_chips_escape_html_and_break_lines() -> None:
    html = views.chips_html([tok(1, "<b>", 0.9), tok(2, "\n", 0.01)], selected=0, marked=1)
    assert "&lt;b&gt;" in html and "<b>" not in html.replace("<br>", "")
    assert "↵" in html and "<br>" in html
    assert views.PROB_BANDS[0][1] in html and views.PROB_BANDS[-1][1] in html
    assert "solid #1c7ed6" in html and "dashed #e03131" in html


def test_token_rows_and_top_k_rows() -> None:
    alt = (tok(5, " Paris", 0.6), tok(6, " Lyon", 0.3))
    rows = views.token_rows([tok(3, " is", 0.5, user=True), tok(5, " Paris", 0.6, alts=alt)])
    assert [r["source"] for r in rows] == ["prompt", "model"]
    assert rows[1]["text"] == "·Paris" and rows[1]["top alternatives"].startswith("·Paris (0.60)")
    top = views.top_k_rows(tok(5, " Paris", 0.6, alts=alt))
    assert [r["chosen"] for r in top] == [True, False]


def test_heatmap_is_causal_and_downsampled() -> None:
    generated = [tok(10 + i, f"t{i}", 0.5, attn=10 + i) for i in range(300)]
    full = views.attention_heatmap(generated, [f"p{i}" for i in range(10)], max_rows=1000, max_cols=1000)
    assert full.z.shape == (300, 309)
    assert np.isnan(full.z[0, 10:]).all() and not np.isnan(full.z[0, :10]).any()
    small = views.attention_heatmap(generated, [f"p{i}" for i in range(10)], max_rows=100, max_cols=50)
    assert small.z.shape[0] <= 100 and small.z.shape[1] <= 50
    assert len(small.row_labels) == small.z.shape[0] and len(small.col_labels) == small.z.shape[1]
    assert small.row_step == 3 and "…" in small.col_labels[0]
    # Block max keeps the largest weight of each block.
    assert np.nanmax(small.z) == pytest.approx(np.nanmax(full.z))


def test_heatmap_layer_and_head_from_full_attention() -> None:
    detail = np.zeros((2, 3, 4), dtype=np.float32)
    detail[1, 2, 3] = 1.0
    detail[0, :, 0] = 1.0
    t = tok(4, "x", 0.5, attn=4, detail=detail)
    view = views.attention_heatmap([t], ["a", "b", "c"], layer=1, head=2)
    assert view.z.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert view.col_labels == ("0:a", "1:b", "2:c", "3:x")
    assert views.attention_row(t, 0, None).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_divergence() -> None:
    assert views.divergence([[1, 2, 3], [1, 2, 3]]) is None
    assert views.divergence([[1, 2, 3], [1, 9, 3], [1, 2, 3]]) == 1
    assert views.divergence([[1, 2], [1, 2, 3]]) == 2
    assert views.divergence([[1]]) is None


def _run(**kw) -> views.RunResult:
    base = dict(run_id="r1", prompt="Hi", settings=SampleSettings(max_len=4), model="m",
                tokens=(tok(1, "a", 0.5, alts=(tok(1, "a", 0.5), tok(2, "b", 0.4))), tok(3, "c", 0.2)),
                created=1.0, status="done")
    base.update(kw)
    return views.RunResult(**base)


def test_branch_and_tree() -> None:
    root = _run()
    forced = views.branch_forced(root, 0, root.generated[0].top_k[1])
    assert [t.token_id for t in forced] == [2]
    child = _run(run_id="r2", parent_id="r1", branch_index=0, tokens=forced, created=2.0)
    grandchild = _run(run_id="r3", parent_id="r2", branch_index=0, created=3.0)
    runs = {r.run_id: r for r in (root, child, grandchild)}
    rows = views.tree_rows(runs, views.root_of(runs, "r3"))
    assert [(r[0], r[1]) for r in rows] == [("r1", 0), ("r2", 1), ("r3", 2)]
    assert "#0 → b" in rows[1][2]
    assert views.total_logprob(root.tokens) == pytest.approx(np.log(0.5) + np.log(0.2))


def test_forms_parse_and_report_the_field() -> None:
    assert forms.parse_lines("a\n\n\\n\n x") == ("a", "\n", " x")
    assert forms.parse_tokens("12\nhello\n 7") == (12, "hello", " 7")
    values = dict(max_len=5, temperature=0.7, nucleus_p=0.0, rng_seed=1, top_k=5)
    with pytest.raises(InvalidSettings) as err:
        forms.build_settings(values)
    assert err.value.field == "nucleus_p" and "(0, 1]" in str(err.value)
    values.update(nucleus_p=0.9, allowed_tokens="a", disallowed_tokens="b")
    with pytest.raises(InvalidSettings) as err:
        forms.build_settings(values)
    assert err.value.field == "allowed_tokens"


def test_store_round_trip_and_code(tmp_path) -> None:
    summary = RunSummary("m", 2, 2, FinishReason.MAX_LEN, notes=("n",))
    run = _run(summary=summary, forced_ids=(2,), prompt_labels=("H", "i"))
    db = tmp_path / "h.sqlite3"
    store.save(run, db)
    store.save(_run(run_id="r0", created=0.5), db)
    assert [e.run_id for e in store.list_runs(path=db)] == ["r1", "r0"]
    back = store.load("r1", db)
    assert back == run
    assert json.loads(store.to_json(run))["output"] == "ac"
    code = store.python_code(run)
    assert "inputs=['Hi', [2]]" in code and "rng_seed=0" in code and "max_len=4" in code
    compile(code, "<run>", "exec")
    assert "api_host='h:1'" in store.python_code(run, "h:1")


def test_data_dir_from_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PROMPT_IDE_DATA", str(tmp_path))
    assert store.data_dir() == tmp_path


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return buf.getvalue()


def test_images_checked() -> None:
    ok = images.check_image(_png(), "a.png")
    assert (ok.format, ok.width) == ("PNG", 8)
    with pytest.raises(ValueError, match="not a readable"):
        images.check_image(b"not an image at all", "b.png")
    with pytest.raises(ValueError, match="limit"):
        images.check_image(b"x" * (images.MAX_IMAGE_BYTES + 1), "c.png")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    with pytest.raises(ValueError, match="allowed"):
        images.check_image(buf.getvalue(), "d.gif")
    assert "vlm-1" in images.vision_hint(["smollm2"], "smollm2")
    assert images.vision_hint(["smollm2", "vlm-1"], "vlm-1") is None
