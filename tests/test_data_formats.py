"""Format detection and normalisation to prompt/chosen/rejected/kind."""

import datasets
import pytest

from forgepipe.data.formats import detect_format, normalise, require_pairs, split_hh
from forgepipe.errors import ForgeError

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_split_hh_takes_the_last_assistant_turn():
    prefix = f"{H} hi{A} hello{H} how are you?{A}"
    assert split_hh(prefix + " fine", prefix + " go away") == (prefix, " fine", " go away")


def test_split_hh_failures():
    assert split_hh(f"{H} no assistant turn", f"{H} none here") is None
    assert split_hh(f"{H} a{A} x", f"{H} b{A} x") is None  # the sides do not share the prompt
    assert split_hh(None, f"{H} a{A} x") is None


def norm(rows, source="src", keep=()):
    ds, dropped = normalise(datasets.Dataset.from_list(rows), source, keep)
    return ds.to_list(), dropped


def test_pair_format():
    rows, dropped = norm([{"prompt": "p", "chosen": "c", "rejected": "r", "extra": 1}])
    assert rows == [{"prompt": "p", "chosen": "c", "rejected": "r", "kind": "pair", "messages": ""}]
    assert dropped == 0


def test_hh_format_drops_and_counts_rows_that_do_not_split():
    good = {"chosen": f"{H} q{A} yes", "rejected": f"{H} q{A} no"}
    bad = {"chosen": f"{H} q without reply", "rejected": f"{H} q{A} no"}
    rows, dropped = norm([good, bad, good])
    assert dropped == 1
    assert rows == [{"prompt": f"{H} q{A}", "chosen": " yes", "rejected": " no", "kind": "pair", "messages": ""}] * 2


def test_response_and_text_formats():
    rows, _ = norm([{"prompt": "p", "response": "r"}])
    assert rows == [{"prompt": "p", "chosen": "r", "rejected": None, "kind": "response", "messages": ""}]
    rows, _ = norm([{"text": "a document"}])
    assert rows == [{"prompt": "", "chosen": "a document", "rejected": None, "kind": "text", "messages": ""}]


def test_null_values_are_dropped():
    rows, dropped = norm([{"prompt": "p", "chosen": "c", "rejected": None}, {"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert dropped == 1 and len(rows) == 1


def test_detection_order_prefers_explicit_prompt():
    assert detect_format(["prompt", "chosen", "rejected"], "s") == "pair"
    assert detect_format(["chosen", "rejected"], "s") == "hh"
    assert detect_format(["text", "prompt", "response"], "s") == "response"


def test_unknown_fields_error_names_source_fields_and_formats():
    with pytest.raises(ForgeError) as info:
        norm([{"question": "q", "answer": "a"}], source="data/qa.jsonl")
    msg = str(info.value)
    assert msg.startswith("data/qa.jsonl: records have fields (question, answer)")
    assert "{prompt, chosen, rejected}" in msg and "HH {chosen, rejected}" in msg and "{text}" in msg
    assert "\n" not in msg


def test_require_pairs_message():
    ds = datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])
    with pytest.raises(ForgeError) as info:
        require_pairs(ds, "sft.jsonl")
    assert str(info.value) == (
        "sft.jsonl: no chosen/rejected pairs (fields: prompt, response); "
        "stage reward needs {prompt, chosen, rejected} or HH {chosen, rejected}"
    )
    require_pairs(datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}]), "hh")


def test_keep_carries_a_margin_field_and_checks_it():
    rows, _ = norm([{"prompt": "p", "chosen": "c", "rejected": "r", "m": 0.5}], keep=["m"])
    assert rows[0]["m"] == 0.5
    with pytest.raises(ForgeError, match="src: no field 'margin'"):
        norm([{"prompt": "p", "chosen": "c", "rejected": "r"}], keep=["margin"])
