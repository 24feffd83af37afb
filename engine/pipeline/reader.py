"""The reader: input records (JSONL lines, dicts or strings) become Requests, or error records for those that cannot
run, in input order; ids are checked unique on disk (IdIndex) and those already done are skipped."""

from __future__ import annotations

import logging
from typing import Container, Iterable, Iterator

from engine.adapters import adapter_names
from engine.config import EngineConfig
from engine.pipeline.request import (Request, RecordError, check_text, decode_line, is_unicode, load_named_specs,
                                     parse_record, record_digest)
from engine.storage.id_index import IdIndex

log = logging.getLogger("engine")

RESERVED_OUTPUT = ("completion", "finish_reason", "num_prompt_tokens", "num_completion_tokens",
                   "completion_token_ids", "error", "line", "steering_name", "activations", "input_digest",
                   "completion_logprobs", "completion_top_logprobs", "prompt_token_ids", "prompt_logprobs",
                   "prompt_top_logprobs")


def error_record(line: int | None, request_id: str | None, error: str) -> dict:
    record: dict = {"line": line}
    if request_id is not None:
        record["id"] = request_id
    record["error"] = error
    return record


def read_requests(sources: Iterable[tuple[int, object]], config: EngineConfig, skip_ids: Container[str] = frozenset(),
                  digests: bool = False) -> Iterator[Request | dict]:
    """(line number, raw bytes or dict or str) -> Requests, or error records for lines that cannot run: the one place
    where a record becomes a request, so whatever is wrong with a record (any exception its checks raise) becomes
    that record's error, and the run goes on.

    Ids in `skip_ids` (already in the output: a set, or pipeline.writer.scan_done_ids's IdIndex) are dropped silently;
    a repeated id is an error. The ids seen are kept on disk (IdIndex), so memory does not grow with the input.
    `digests`: each Request carries its record's digest (engine.pipeline.request.record_digest), which its result keeps.
    """
    steering, capture = config.steering.spec(), config.capture.spec()
    named = load_named_specs(config.steering_specs) if config.steering_specs else {}
    adapters = adapter_indices(config)
    seen = IdIndex()  # its temporary file goes when the generator ends or is dropped; each id keeps its line
    for line, raw in sources:
        request_id = None
        try:
            obj = decode_line(raw, line) if isinstance(raw, bytes) else {"prompt": raw} if isinstance(raw, str) else raw
            if not isinstance(obj, dict):
                raise RecordError(f"record {line} is a {type(obj).__name__}; give a dict with 'prompt' or 'messages'")
            request_id = obj.get("id") if isinstance(obj.get("id"), str) and is_unicode(obj["id"]) else None
            if isinstance(raw, bytes):
                check_text(raw, obj)
            request = checked_request(obj, line, config, steering, named, capture, adapters)
            request_id = request.id
            # before the skip, so a resume reports a repeated id as the first run did
            _check_unique(seen, request.id, line, "id" in obj)
            if request.id in skip_ids:
                continue
            if digests:
                request.digest = record_digest(obj)
            yield request
        except RecordError as exc:
            yield error_record(line, request_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - a record is the unit of failure; the first is logged in full
            _log_unexpected(exc)
            yield error_record(line, request_id, f"could not read this record ({type(exc).__name__}: {exc})")


def adapter_indices(config: EngineConfig) -> dict[str, int]:
    """Each loaded adapter's name -> its index in the engine core (0 is the base model)."""
    return {name: i + 1 for i, name in enumerate(adapter_names(config.adapters))}


def checked_request(obj: dict, line: int, config: EngineConfig, steering, named: dict, capture,
                    adapters: dict[str, int]) -> Request:
    """A record (a dict) -> its Request, every check of one record done (parse_record's, no output field among its
    pass-through fields, every value one the wire can carry); RecordError naming what is wrong. `steering`,
    `capture`: the run's defaults; `named`: the named steering specs; `adapters`: adapter_indices'."""
    request = parse_record(obj, -1, line, config.sampling, steering, named, capture, adapters)
    clash = [k for k in request.extra if k in RESERVED_OUTPUT]
    if clash:
        raise RecordError(f"field(s) {clash} are output fields of the engine; rename them in the input")
    request.check_wire()
    return request


def _check_unique(seen: IdIndex, request_id: str, line: int, is_explicit: bool) -> None:
    """RecordError if an earlier record has this id, saying where that id came from on both sides."""
    if seen.add(request_id, str(line), "explicit" if is_explicit else "line"):
        return
    first_line, how = seen.get(request_id)
    if not is_explicit:
        raise RecordError(f"line {line} has no 'id', so its id is its line number {request_id!r}, which line "
                          f"{first_line} already gives as its id; give line {line} an id (or give every line one)")
    origin = "as its id" if how == "explicit" else "by its line number (it has no 'id')"
    raise RecordError(f"duplicate id {request_id!r}: line {first_line} already has it {origin}; ids must be unique "
                      f"within the input")


_unexpected_logged = False


def _log_unexpected(exc: Exception) -> None:
    """Log the first unexpected exception of a run's records with its traceback: an engine bug stays visible."""
    global _unexpected_logged
    if not _unexpected_logged:
        _unexpected_logged = True
        log.warning("unexpected error while reading a record (reported as its error record)", exc_info=exc)
