"""Every session-state key in one place, with typed accessors.

Widget keys end in ``_w``; Streamlit drops a widget's state when its page is not shown, so
values other pages need are copied into plain keys.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from workbench.views import RunResult

# Connection
BACKEND_W = "backend_w"            # "Embedded engine" | "Remote server"
HOST_W = "remote_host_w"
API_KEY_W = "remote_api_key_w"
# Settings sidebar
MODEL_W = "model_w"
MAX_LEN_W = "max_len_w"
TEMPERATURE_W = "temperature_w"
NUCLEUS_W = "nucleus_p_w"
SEED_W = "seed_w"
SEED_MODE_W = "seed_mode_w"        # "fixed" | "advance"
TOP_K_W = "top_k_w"
STOP_TOKENS_W = "stop_tokens_w"
STOP_STRINGS_W = "stop_strings_w"
ALLOWED_W = "allowed_w"
DISALLOWED_W = "disallowed_w"
ATTENTION_W = "return_attention_w"
FULL_ATTENTION_W = "full_attention_w"
SCORE_W = "score_prompt_w"
STOP_AT_EOS_W = "stop_at_eos_w"
PREFILL_W = "prefill_w"
# Playground
PROMPT_W = "prompt_w"
PROMPT = "prompt"                  # the last submitted prompt (survives page switches)
RUN_W = "run_w"
STOP_W = "stop_w"
CHAT_MESSAGE_W = "chat_message_w"
CHAT_SYSTEM_W = "chat_system_w"
CHAT_WRAP_W = "chat_wrap_w"
IMAGE_W = "image_w"                # the file uploader
SAMPLE_IMAGE_W = "sample_image_w"  # a sample (or the kept upload / reopened run's image)
SAMPLE_IMAGE = "sample_image"      # its value, kept while the playground is not shown
IMAGE_PLACE_W = "image_place_w"    # "after the text" | "before the text"
IMAGE_PLACE = "image_place"
KEPT_IMAGE = "kept_image"          # (label, bytes): the last upload or a reopened run's image
PLACES = ("before the text", "after the text")
ATTACHED = "attached_image"        # images.Attached | None, as the playground last resolved it
TOKEN_PICK_W = "token_pick_w"
ALT_PICK_W = "alt_pick_w"
BRANCH_W = "branch_w"
TREE_W = "tree_w"
PENDING_SEED = "pending_seed"      # applied to SEED_W before the widget is drawn
# Runs
RUNS = "runs"                      # run_id -> RunResult (this session's branch trees)
CURRENT = "current_run_id"
# Compare
COMPARE_N_W = "compare_n_w"
COMPARE_SEED_W = "compare_seed_w"
COMPARE_RUN_W = "compare_run_w"
COMPARE = "compare_results"        # list[RunResult]
# Attention
ATT_LAYER_W = "att_layer_w"
ATT_HEAD_W = "att_head_w"
ATT_ROW_W = "att_row_w"
# Tokenizer
TOKENIZER_TEXT_W = "tokenizer_text_w"
# History
HISTORY_PICK_W = "history_pick_w"


def get(key: str, default: Any = None) -> Any:
    """A session value, or ``default``."""
    return st.session_state.get(key, default)


def put(key: str, value: Any) -> None:
    """Set a session value."""
    st.session_state[key] = value


def runs() -> dict[str, RunResult]:
    """This session's runs by id (the branch trees)."""
    return st.session_state.setdefault(RUNS, {})


def store_run(run: RunResult, *, current: bool = True) -> None:
    """Keep a run (replacing an older version of it); optionally make it the current one."""
    runs()[run.run_id] = run
    if current:
        st.session_state[CURRENT] = run.run_id


def current_run() -> RunResult | None:
    """The run the playground, table and attention pages show."""
    run_id = st.session_state.get(CURRENT)
    return runs().get(run_id) if run_id else None


def prompt() -> str:
    """The prompt as last submitted (or typed) in the playground."""
    return str(st.session_state.get(PROMPT, ""))


def seed_after_run(seed: int) -> None:
    """Advance the seed widget by one on the next rerun, when the seed mode says so."""
    if st.session_state.get(SEED_MODE_W, "fixed") == "advance":
        st.session_state[PENDING_SEED] = seed + 1


def pin_seed(seed: int) -> None:
    """Put a seed into the playground's settings and fix it there."""
    st.session_state[PENDING_SEED] = seed
    st.session_state["pending_seed_mode"] = "fixed"


def keep_image(label: str, data: bytes, after: bool) -> None:
    """Offer a reopened run's image in the playground's image panel, selected."""
    st.session_state[KEPT_IMAGE] = (label, data)
    st.session_state[SAMPLE_IMAGE] = st.session_state[SAMPLE_IMAGE_W] = label
    st.session_state[IMAGE_PLACE] = st.session_state[IMAGE_PLACE_W] = PLACES[1] if after else PLACES[0]


def apply_pending() -> None:
    """Apply changes queued for widgets before the widgets are drawn."""
    if PENDING_SEED in st.session_state:
        st.session_state[SEED_W] = st.session_state.pop(PENDING_SEED)
    if "pending_seed_mode" in st.session_state:
        st.session_state[SEED_MODE_W] = st.session_state.pop("pending_seed_mode")
