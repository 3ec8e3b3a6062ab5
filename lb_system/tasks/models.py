"""The task bodies the API accepts, as pydantic models (also the source of their OpenAPI schemas)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# SQLite's largest rowid: any larger id names no task.
MAX_ID = 2**63 - 1

# One explicit set of blanks, the same in every regex dialect (Python's, pydantic's Rust, a client's
# JSON Schema validator): a title is 1-200 characters, not all of them blanks, then trimmed of them.
BLANKS = " \t\n\r\f\v"
NOT_BLANK = r"[^ \t\n\r\f\v]"


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain NUL (\\u0000)")
    return text


# PostgreSQL's text cannot hold NUL, so neither store takes it: the same answer on both.
NO_NUL = Field(json_schema_extra={"not": {"pattern": "\u0000"}})
Title = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=NOT_BLANK),
    AfterValidator(_no_nul),
    AfterValidator(lambda title: title.strip(BLANKS)),
    NO_NUL,
]
Description = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_no_nul), NO_NUL]


class TaskFields(BaseModel):
    """A full task body, as POST and PUT take it."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"title": "Write tests", "description": "real ones", "done": False}]},
    )
    title: Title
    description: Description = ""
    done: bool = False


class TaskPatch(BaseModel):
    """Any subset of the fields; an explicit null is invalid, not "unset"."""

    # An empty patch is answered as an empty body (400), so the schema asks for one field at least.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1, "examples": [{"done": True}]})
    title: Title = None  # type: ignore[assignment]
    description: Description = None  # type: ignore[assignment]
    done: bool = None  # type: ignore[assignment]
