"""The proto matches the wire protocol's table, and the committed generated code is fresh."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as F

from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "sampler_core" / "wire" / "_generated"

# (message, field, number, type, repeated) straight from the spec's message table.
SPEC = [
    ("SampleTokensRequest", "prompt", 1, F.TYPE_UINT32, True),
    ("SampleTokensRequest", "settings", 2, F.TYPE_MESSAGE, False),
    ("SampleTokensRequest", "return_attention", 4, F.TYPE_BOOL, False),
    ("SampleTokensRequest", "model_name", 5, F.TYPE_STRING, False),
    ("SampleTokensRequest", "inputs", 7, F.TYPE_MESSAGE, True),
    ("PromptInput", "text", 1, F.TYPE_STRING, False),
    ("PromptInput", "image_bytes", 2, F.TYPE_BYTES, False),
    ("PromptInput", "image_base64", 3, F.TYPE_STRING, False),
    ("PromptInput", "token_ids", 4, F.TYPE_MESSAGE, False),
    ("TokenIds", "tokens", 1, F.TYPE_UINT32, True),
    ("SampleSettings", "max_len", 1, F.TYPE_INT32, False),
    ("SampleSettings", "temperature", 2, F.TYPE_FLOAT, False),
    ("SampleSettings", "nucleus_p", 3, F.TYPE_FLOAT, False),
    ("SampleSettings", "stop_tokens", 4, F.TYPE_STRING, True),
    ("SampleSettings", "rng_seed", 5, F.TYPE_UINT64, False),
    ("SampleSettings", "allowed_tokens", 6, F.TYPE_MESSAGE, True),
    ("SampleSettings", "stop_strings", 7, F.TYPE_STRING, True),
    ("SampleSettings", "disallowed_tokens", 8, F.TYPE_MESSAGE, True),
    ("InputToken", "string_token", 1, F.TYPE_STRING, False),
    ("InputToken", "token_id", 2, F.TYPE_UINT32, False),
    ("SampleTokensResponse", "token", 1, F.TYPE_MESSAGE, False),
    ("SampleTokensResponse", "budget", 2, F.TYPE_MESSAGE, False),
    ("SampleTokensResponse", "transaction", 4, F.TYPE_MESSAGE, False),
    ("Token", "final_logit", 1, F.TYPE_MESSAGE, False),
    ("Token", "token_type", 3, F.TYPE_ENUM, False),
    ("Token", "top_k", 4, F.TYPE_MESSAGE, True),
    ("Token", "attention", 5, F.TYPE_FLOAT, True),
    ("Logit", "token_id", 1, F.TYPE_UINT32, False),
    ("Logit", "string_token", 2, F.TYPE_STRING, False),
    ("Logit", "prob", 3, F.TYPE_FLOAT, False),
    ("TokenizeRequest", "text", 1, F.TYPE_STRING, False),
    ("TokenizeRequest", "model_name", 2, F.TYPE_STRING, False),
    ("TokenizeResponse", "tokens", 1, F.TYPE_MESSAGE, True),
    ("TokenizeAndSampleTokensRequest", "text", 1, F.TYPE_STRING, False),
    ("TokenizeAndSampleTokensRequest", "settings", 2, F.TYPE_MESSAGE, False),
    ("TokenizeAndSampleTokensRequest", "return_attention", 4, F.TYPE_BOOL, False),
    ("TokenizeAndSampleTokensRequest", "model_name", 5, F.TYPE_STRING, False),
    ("TokenTransaction", "num_prompt_tokens", 1, F.TYPE_INT32, False),
    ("TokenTransaction", "num_generated_tokens", 2, F.TYPE_INT32, False),
    ("TokenTransaction", "cost_multiplier", 3, F.TYPE_INT32, False),
    ("TokenTransaction", "create_time", 4, F.TYPE_MESSAGE, False),
    ("TokenTransaction", "transaction_type", 5, F.TYPE_STRING, False),
    ("TokenTransaction", "transaction_id", 6, F.TYPE_STRING, False),
    ("TokenTransaction", "model_name", 7, F.TYPE_STRING, False),
    ("TokenTransaction", "confirmed", 8, F.TYPE_BOOL, False),
    ("GetTokenBudgetRequest", "transaction_type", 1, F.TYPE_STRING, False),
    ("TokenBudget", "token_limit", 1, F.TYPE_INT32, False),
    ("TokenBudget", "tokens_spent", 2, F.TYPE_INT32, False),
    ("TokenBudget", "request_limit", 3, F.TYPE_INT32, False),
    ("TokenBudget", "requests_spent", 4, F.TYPE_INT32, False),
    ("ListTransactionsResponse", "transactions", 1, F.TYPE_MESSAGE, True),
    ("ListModelsResponse", "model_names", 1, F.TYPE_STRING, True),
]
ONEOFS = {("PromptInput", "payload"): {"text", "image_bytes", "image_base64", "token_ids"},
          ("InputToken", "token"): {"string_token", "token_id"},
          ("SampleTokensResponse", "response"): {"token", "budget", "transaction"}}
RPCS = {"SampleTokens": ("SampleTokensRequest", "SampleTokensResponse", True),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "TokenizeAndSampleTokens": ("TokenizeAndSampleTokensRequest", "SampleTokensResponse", True),
        "GetTokenBudget": ("GetTokenBudgetRequest", "TokenBudget", False),
        "ListTransactions": ("Empty", "ListTransactionsResponse", False),
        "ListModels": ("Empty", "ListModelsResponse", False)}


def test_every_spec_field_has_its_number_and_type() -> None:
    assert pb.DESCRIPTOR.package == "prompt_ide"
    for message, name, number, type_, repeated in SPEC:
        field = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[name]
        assert (field.number, field.type) == (number, type_), (message, name)
        assert field.is_repeated == repeated, (message, name)


def test_spec_numbers_are_the_only_low_numbers() -> None:
    """Extensions take numbers from 100 up; nothing else sits among the protocol's numbers."""
    spec_numbers: dict[str, set[int]] = {}
    for message, _, number, _, _ in SPEC:
        spec_numbers.setdefault(message, set()).add(number)
    for message, numbers in spec_numbers.items():
        for field in pb.DESCRIPTOR.message_types_by_name[message].fields:
            assert field.number in numbers or field.number >= 100, (message, field.name)
    reserved = {"SampleTokensRequest": {3, 6}, "SampleTokensResponse": {3}, "Token": {2}}
    for message, numbers in reserved.items():
        for field in pb.DESCRIPTOR.message_types_by_name[message].fields:
            assert field.number not in numbers


def test_oneofs_and_enum() -> None:
    for (message, oneof), members in ONEOFS.items():
        group = pb.DESCRIPTOR.message_types_by_name[message].oneofs_by_name[oneof]
        assert members <= {f.name for f in group.fields}
    assert {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["TokenType"].values} == {
        "UNKNOWN": 0, "USER": 1, "MODEL": 2}


def test_service_methods() -> None:
    service = pb.DESCRIPTOR.services_by_name["Sampler"]
    assert service.full_name == "prompt_ide.Sampler"
    for name, (request, response, streaming) in RPCS.items():
        method = service.methods_by_name[name]
        assert method.input_type.name == request and method.output_type.name == response
        assert method.server_streaming == streaming and not method.client_streaming


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerate into a scratch folder: the committed files must be byte-identical."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()
                   and "__pycache__" not in p.parts)
    committed = sorted(p.relative_to(GENERATED) for p in GENERATED.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts)
    assert fresh == committed
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, GENERATED / p, shallow=False)]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"
