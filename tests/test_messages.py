"""The wire schemas of the Kafka topics (isplit.messages): round trips, versioning, ids."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from isplit.messages import (
    MAX_MESSAGE_BYTES,
    TOPIC_CANDIDATES,
    TOPIC_DEAD_LETTER,
    TOPIC_PARTITIONS,
    TOPIC_RESULTS,
    DatasetSpec,
    DeadLetter,
    MessageError,
    ModelSpec,
    SplitCandidate,
    TrainingResult,
    candidate_id_for,
    decode,
    encode,
    resolve_under,
)


def make_candidate(**changes: object) -> SplitCandidate:
    fields: dict[str, object] = dict(
        analysis_id="a1b2c3",
        candidate_id=candidate_id_for("a1b2c3", "layer3.1"),
        model=ModelSpec(
            arch="resnet18", num_classes=10, in_channels=1, input_size=28, weights_uri="models/r18/weights.pt"
        ),
        dataset=DatasetSpec(name="fashion-mnist", classes=[0, 3, 7], max_test_images=500),
        cut="layer3.1",
        predicted_rank=1,
        cui=0.0123,
        log10_cui=-1.91,
        size_rank=4,
        output_shape=[256, 2, 2],
        output_bytes=4096,
        target="label",
    )
    fields.update(changes)
    return SplitCandidate(**fields)


def make_result() -> TrainingResult:
    return TrainingResult(
        analysis_id="a1b2c3",
        candidate_id="a1b2c3-layer3_1",
        cut="layer3.1",
        status="succeeded",
        accuracy_original=0.91,
        accuracy_split=0.89,
        bytes_per_image={"fp32": 1024, "fp16": 512, "int8": 256},
        head_params=1000,
        tail_params=2000,
        training_seconds=12.5,
        model_name="a1b2c3-layer3_1",
    )


@pytest.mark.parametrize(
    "message",
    [
        make_candidate(),
        make_result(),
        DeadLetter.from_bytes(b"\x00\xffnot json", source_topic=TOPIC_CANDIDATES, reason="bad", service="t"),
    ],
    ids=["SplitCandidate", "TrainingResult", "DeadLetter"],
)
def test_message_round_trips_through_its_wire_form(message):
    assert decode(type(message), encode(message)) == message


def test_wire_form_is_json_with_schema_version_1():
    payload = json.loads(encode(make_candidate()))
    assert payload["schema_version"] == 1
    assert payload["model"]["arch"] == "resnet18"


def test_unsupported_schema_version_is_rejected_naming_it_and_the_supported_one():
    payload = json.loads(encode(make_candidate()))
    payload["schema_version"] = 2
    with pytest.raises(MessageError, match=r"SplitCandidate: unsupported schema_version 2 \(supported: 1\)"):
        decode(SplitCandidate, json.dumps(payload).encode())


def test_missing_schema_version_is_rejected():
    payload = json.loads(encode(make_candidate()))
    del payload["schema_version"]
    with pytest.raises(MessageError, match=r"missing schema_version \(supported: 1\)"):
        decode(SplitCandidate, json.dumps(payload).encode())


def test_bad_json_is_rejected_with_its_position():
    with pytest.raises(MessageError, match=r"SplitCandidate: not valid JSON \(.* at line 1 column 2\)"):
        decode(SplitCandidate, b"{not json")


def test_non_utf8_bytes_are_rejected():
    with pytest.raises(MessageError, match="not UTF-8"):
        decode(SplitCandidate, b"\xff\xfe{}")


def test_empty_message_is_rejected():
    with pytest.raises(MessageError, match="empty message"):
        decode(TrainingResult, b"")


def test_json_that_is_not_an_object_is_rejected():
    with pytest.raises(MessageError, match="expected a JSON object, got list"):
        decode(TrainingResult, b"[1, 2]")


@pytest.mark.parametrize("model", [SplitCandidate, TrainingResult])
def test_deeply_nested_json_is_a_message_error_not_a_recursion_error(model):
    with pytest.raises(MessageError, match="nested deeper than 32 levels"):
        decode(model, b"[" * 100000 + b"]" * 100000)


def test_nesting_below_the_parser_limit_but_over_ours_is_rejected():
    payload = json.loads(encode(make_candidate()))
    payload["extra"] = json.loads("[" * 40 + "]" * 40)  # an ignored field still costs memory
    with pytest.raises(MessageError, match="nested deeper"):
        decode(SplitCandidate, json.dumps(payload).encode())


def test_oversized_message_is_rejected_before_parsing():
    with pytest.raises(MessageError, match=rf"over the limit of {MAX_MESSAGE_BYTES} bytes"):
        decode(SplitCandidate, b" " * (MAX_MESSAGE_BYTES + 1))


def test_integer_literal_too_long_to_convert_is_a_message_error():
    with pytest.raises(MessageError, match="not valid JSON"):
        decode(SplitCandidate, b'{"schema_version": ' + b"1" * 5000 + b"}")


@pytest.mark.parametrize("uri", ["/etc/passwd", "../outside.pt", "models/../../x.pt"])
def test_resolve_under_refuses_paths_leading_out_of_the_root(tmp_path, uri):
    with pytest.raises(MessageError, match="outside the artifact root"):
        resolve_under(tmp_path, uri, "weights")


def test_resolve_under_refuses_a_symlink_out_of_the_root(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "link.pt").symlink_to("/etc/passwd")
    with pytest.raises(MessageError, match="'models/link.pt' is outside"):
        resolve_under(tmp_path, "models/link.pt", "weights")
    assert resolve_under(tmp_path, "models/m.pt", "weights") == Path(tmp_path).resolve() / "models" / "m.pt"


def test_invalid_fields_are_summarised_on_one_line_with_their_paths():
    payload = json.loads(encode(make_candidate()))
    payload["model"]["num_classes"] = "ten"
    del payload["cut"]
    with pytest.raises(MessageError) as raised:
        decode(SplitCandidate, json.dumps(payload).encode())
    message = str(raised.value)
    assert "\n" not in message
    assert "model.num_classes: Input should be a valid integer" in message
    assert "(got 'ten')" in message
    assert "cut: Field required" in message


def test_unknown_fields_are_ignored_for_forward_compatibility():
    result = make_result()
    payload = json.loads(encode(result))
    payload["added_in_a_later_release"] = {"x": 1}
    assert decode(TrainingResult, json.dumps(payload).encode()) == result


def test_candidate_id_is_deterministic():
    assert candidate_id_for("a1b2c3", "layer3.1") == candidate_id_for("a1b2c3", "layer3.1") == "a1b2c3-layer3_1"


@pytest.mark.parametrize("cut", ["features.denseblock4.denselayer16.conv2", "Mixed_5b.branch1x1", "a/../b c:d"])
def test_candidate_id_is_safe_as_file_url_and_torchserve_model_name(cut):
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", candidate_id_for("0f3e-9a", cut))


def test_candidate_ids_of_different_cuts_differ():
    assert candidate_id_for("a1", "layer3.0") != candidate_id_for("a1", "layer3.1")


def test_overlong_candidate_id_is_shortened_and_stays_unique():
    first = candidate_id_for("a" * 100, "features.denseblock4.denselayer15.conv2")
    second = candidate_id_for("a" * 100, "features.denseblock4.denselayer16.conv2")
    assert len(first) <= 128 and len(second) <= 128
    assert first != second


def test_candidate_id_rejects_an_unsafe_analysis_id():
    with pytest.raises(ValueError, match="analysis id '../x'"):
        candidate_id_for("../x", "layer1")


def test_failed_result_must_say_why():
    with pytest.raises(ValidationError, match="status 'failed' needs an error message"):
        TrainingResult(analysis_id="a1", candidate_id="a1-l", cut="l", status="failed")


def test_bytes_per_image_only_knows_fp32_fp16_int8():
    with pytest.raises(ValidationError, match="bytes_per_image"):
        TrainingResult(analysis_id="a1", candidate_id="a1-l", cut="l", status="succeeded", bytes_per_image={"bf16": 2})


def test_dead_letter_keeps_the_original_bytes_exactly():
    original = bytes(range(256))
    letter = DeadLetter.from_bytes(original, source_topic=TOPIC_CANDIDATES, reason="r", service="trainer")
    assert decode(DeadLetter, encode(letter)).original() == original


def test_weights_uri_must_stay_under_the_artifact_root():
    with pytest.raises(ValidationError, match="must stay under the artifact root"):
        ModelSpec(arch="r", num_classes=2, in_channels=1, input_size=8, weights_uri="models/../../etc/passwd")


def test_non_finite_cui_is_rejected_because_json_cannot_carry_it():
    with pytest.raises(ValidationError, match="log10_cui"):
        make_candidate(cui=0.0, log10_cui=float("-inf"))


def test_class_subset_must_be_distinct():
    with pytest.raises(ValidationError, match="distinct"):
        DatasetSpec(name="digits", classes=[1, 1])


def test_created_at_is_utc_even_when_given_naive():
    candidate = make_candidate(created_at=datetime(2024, 5, 1, 12, 0))
    assert candidate.created_at == datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert make_candidate().created_at.tzinfo == timezone.utc


def test_topics_have_their_contract_partition_counts():
    assert TOPIC_PARTITIONS == {TOPIC_CANDIDATES: 6, TOPIC_RESULTS: 3, TOPIC_DEAD_LETTER: 1}
