"""The workbench's plain logic (no Streamlit, no model): view models, forms, history store, images."""

from __future__ import annotations

import io
import json
from dataclasses import replace

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
    values.update(disallowed_tokens="")
    assert forms.build_settings(values).stop_at_eos is True
    assert forms.build_settings({**values, "stop_at_eos": False}).stop_at_eos is False
    assert forms.build_settings(values).prefill == ""
    assert forms.build_settings({**values, "prefill": "fast"}).prefill == "fast"
    assert [forms.prefill_label(m) for m in forms.PREFILL_CHOICES] == [
        "engine default", "float32 (exact arithmetic)", "fixed16 (~1.4x faster, ~1e-3 off)",
        "fast (~2x faster, not within 1e-3)"]
    with pytest.raises(InvalidSettings) as err:
        forms.build_settings({**values, "prefill": "int8"})
    assert err.value.field == "prefill"


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
    assert "prefill" not in code
    labelled = _run(run_id="r2", summary=replace(summary, prefill="fast"),
                    settings=SampleSettings(max_len=4, prefill="fast"))
    store.save(labelled, db)
    assert store.load("r2", db) == labelled
    assert "prefill='fast'" in store.python_code(labelled)
    assert views.prefill_tag(labelled.summary) == "prefill fast (not exact)"
    assert views.prefill_tag(summary) == "" and views.prefill_tag(None) == ""
    assert (views.prefill_tag(replace(summary, prefill="fixed16"))
            == "prefill fixed16 (~1e-3 off float32)")
    reused = _run(run_id="r3", summary=replace(summary, prefill_reused=True))
    store.save(reused, db)
    assert store.load("r3", db).summary.prefill_reused and not back.summary.prefill_reused
    assert views.reuse_tag(reused.summary) == "prefill reused"
    assert views.reuse_tag(summary) == "" and views.reuse_tag(None) == ""
    head = _run(run_id="r4", summary=replace(summary, num_prompt_tokens=2000,
                                             prefill_reused=True, prefill_reused_tokens=1980))
    store.save(head, db)
    assert store.load("r4", db).summary.prefill_reused_tokens == 1980
    assert views.reuse_tag(head.summary) == "prefill reused for 1,980 of 2,000 tokens"
    whole = replace(head.summary, prefill_reused_tokens=2000)
    assert views.reuse_tag(whole) == "prefill reused"


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
    ok, message = images.vision_status(["smollm2"], "smollm2")
    assert not ok and "vlm-1" in message and "does not list" in message
    ok, message = images.vision_status(["smollm2", "vlm-1"], "smollm2")
    assert not ok and "choose 'vlm-1'" in message
    ok, message = images.vision_status(["smollm2", "vlm-1"], "vlm-1")
    assert ok and "synthetic" in message and "not about photos" in message
    assert images.vision_status(["/models/SmolVLM-256M"], "/models/SmolVLM-256M")[0]
    assert "10 MiB" in images.limit_text()


def test_broken_and_truncated_uploads_say_so() -> None:
    png = _png((32, 32))
    with pytest.raises(ValueError, match="not a readable PNG, JPEG or WebP"):
        images.check_image(png[: len(png) // 2], "half.png")
    with pytest.raises(ValueError, match="empty"):
        images.check_image(b"", "e.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="WEBP")
    assert images.check_image(buf.getvalue(), "w.webp").format == "WEBP"


def test_sample_images_list_the_vision_ones_first() -> None:
    samples = images.sample_images()
    assert samples, "assets/images holds sample pictures"
    labels = list(samples)
    assert labels[0].startswith("vlm/") and "red_circle.png" in labels
    assert all(p.is_file() for p in samples.values())
    for label, path in samples.items():
        assert images.check_image(path.read_bytes(), label).width > 0


def _image_tokens(image: int, rows: int, cols: int, start: int) -> list[tuple[int, str]]:
    return [(start + r * cols + c, f"<image {image}: patch {r + 1},{c + 1}>")
            for r in range(rows) for c in range(cols)]


def test_image_grids_from_token_texts() -> None:
    pairs = [(0, "Look"), *_image_tokens(1, 2, 3, 1), (7, ":"), *_image_tokens(2, 4, 4, 8),
             (24, "<image 1 tile 1: patch 1,1>"), (25, "<image x>")]
    grids = views.image_grids(list(reversed(pairs)))  # order does not matter
    assert [(g.image, g.rows, g.cols) for g in grids] == [(1, 2, 3), (2, 4, 4)]
    assert grids[0].positions == ((1, 2, 3), (4, 5, 6))
    assert grids[1].positions[3][3] == 23 and grids[1].all_positions == tuple(range(8, 24))
    # A cell no token names stays empty.
    holes = views.image_grids([(5, "<image 1: patch 2,2>")])
    assert holes[0].positions == ((None, None), (None, 5))
    assert views.image_grids([(0, "plain"), (1, "text")]) == ()


def test_overlay_matrix_share_and_text_positions() -> None:
    grid = views.image_grids(_image_tokens(1, 2, 2, 2))[0]
    weights = np.array([0.4, 0.1, 0.05, 0.15, 0.2, 0.1])  # positions 2..5 are the image
    z = views.overlay_matrix(weights, grid)
    assert np.allclose(z, [[0.05, 0.15], [0.2, 0.1]])
    assert views.image_share(weights, [grid]) == pytest.approx(0.5)
    assert views.text_positions(8, [grid]) == [0, 1, 6, 7]
    short = views.overlay_matrix(weights[:4], grid)  # a row that ends inside the image
    assert np.isnan(short[1]).all() and short[0].tolist() == pytest.approx([0.05, 0.15])
    assert views.image_share(np.zeros(6), [grid]) == 0.0


def test_run_grids_chips_and_rows_for_image_tokens() -> None:
    prompt = [tok(0, "<image 1: patch 1,1>", 0.0, user=True), tok(1, "<image 1: patch 1,2>", 0.0, user=True),
              tok(2, "Hi", 0.3, user=True)]
    run = _run(tokens=(*prompt, tok(3, "a", 0.5, attn=3)), prompt_labels=("<image 1: patch 1,1>",
                                                                         "<image 1: patch 1,2>", "Hi"))
    grids = views.run_image_grids(run)
    assert len(grids) == 1 and grids[0].positions == ((0, 1),)
    assert views.run_image_grids(_run(tokens=(tok(3, "a", 0.5),), prompt_labels=run.prompt_labels)) == grids
    html = views.chips_html(run.tokens)
    assert "▦1 1,2" in html and views.IMAGE_CHIP_COLOUR in html and "&lt;image" not in html.split("title")[0]
    rows = views.token_rows(run.tokens)
    assert [r["source"] for r in rows] == ["image", "image", "prompt", "model"]
    assert rows[1]["text"] == "<image 1: patch 1,2>" and rows[1]["prob"] is None and rows[2]["prob"] == 0.3
    assert views.token_label(1, prompt[1]) == "1 ▦1 1,2"
    assert views.context_labels(run.prompt_labels, run.generated, 4) == ["0:▦1 1,1", "1:▦1 1,2", "2:Hi", "3:a"]
    assert "image patch" in views.legend_html(images=True) and "image patch" not in views.legend_html()


def test_prompt_parts_place_the_image() -> None:
    from sampler_core.inputs import ImagePart, TextPart, TokenIdsPart
    from workbench.execute import prompt_parts, with_image_settings

    png = _png()
    assert prompt_parts("Q", (), png) == (ImagePart(png), TextPart("Q"))
    assert prompt_parts("Q", (7,), png, image_after=True) == (TextPart("Q"), ImagePart(png), TokenIdsPart((7,)))
    assert prompt_parts("", (), png) == (ImagePart(png),)
    s = with_image_settings(SampleSettings(max_len=3))
    assert s.score_prompt and s.return_attention and s.max_len == 3


def test_store_keeps_images_and_migrates_old_files(tmp_path) -> None:
    import sqlite3

    db = tmp_path / "h.sqlite3"
    png = _png((5, 5))
    sha = store.put_image(png, db)
    assert store.put_image(png, db) == sha and store.get_image(sha, db) == png
    assert store.get_image(None, db) is None and store.get_image("0" * 64, db) is None
    (store.image_dir(db) / sha).write_bytes(b"altered")
    assert store.get_image(sha, db) is None  # a changed file is not passed off as the image
    store.put_image(png, db)
    with pytest.raises(ValueError, match="64 hex"):
        store.image_path("../etc/passwd", db)
    run = _run(image_sha=sha, image_name="dot.png", image_after=True)
    store.save(run, db)
    back = store.load("r1", db)
    assert back == run and back.image_after and back.image_sha == sha
    assert store.list_runs(path=db)[0].image_name == "dot.png"
    code = store.python_code(back, path=db)
    assert "image = open(" in code and str(store.image_dir(db) / sha) in code
    assert "inputs=['Hi', image]" in code
    compile(code, "<run>", "exec")
    assert "inputs=[image, 'Hi']" in store.python_code(_run(image_sha=sha), path=db)
    # A history file written before images were kept gains the columns.
    old = tmp_path / "old" / "history.sqlite3"
    old.parent.mkdir()
    conn = sqlite3.connect(old)
    conn.execute(store.SCHEMA.replace(",\n    image_sha TEXT,\n    image_after INTEGER NOT NULL DEFAULT 0", ""))
    conn.commit()
    conn.close()
    store.save(_run(), old)
    assert store.load("r1", old).image_sha is None


def test_overlay_figure_lays_the_grid_over_the_picture() -> None:
    from workbench.components import overlay

    grid = views.image_grids(_image_tokens(1, 2, 4, 0))[0]
    z = views.overlay_matrix(np.linspace(0.0, 0.7, 8), grid)
    fig = overlay.figure(_png((40, 20)), z, grid, "t")
    heat = fig.data[0]
    assert fig.layout.images[0].source.startswith("data:image/")
    w, h = fig.layout.images[0].sizex, fig.layout.images[0].sizey
    assert w == 2 * h == overlay.DRAW_SIDE  # scaled up, aspect kept
    assert list(heat.x) == [w / 8, 3 * w / 8, 5 * w / 8, 7 * w / 8] and list(heat.y) == [h / 4, 3 * h / 4]
    assert heat.zmax == pytest.approx(0.7) and heat.zmin == 0.0
    blank = overlay.figure(None, z, grid, "t")  # the kept copy is gone: a blank canvas, same grid
    assert blank.layout.images[0].sizex == 2 * blank.layout.images[0].sizey


def test_run_timing_and_its_line() -> None:
    assert views.run_timing(10.0, []) is None
    one = views.run_timing(10.0, [10.4])
    assert one == views.RunTiming(first_token_s=pytest.approx(0.4), tokens_per_s=None)
    assert views.timing_line(one) == "first token 0.40 s"
    many = views.run_timing(10.0, [10.5, 10.6, 10.7, 10.8, 10.9])
    assert many.first_token_s == pytest.approx(0.5) and many.tokens_per_s == pytest.approx(10.0)
    assert views.timing_line(many) == "first token 0.50 s · 10.0 tokens/s"
