"""Grader configs with OpenAI's exact shapes, and `parse_grader`, which names the bad field.

Validation goes through `parse_grader(data, param)` rather than a pydantic union, so an error in a
nested grader comes back as `param="method.reinforcement.grader.graders.accuracy.operation"`, not
as a union dump.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue

from service.core.errors import InvalidRequest
from service.graders.formula import Formula, FormulaError
from service.graders.similarity import METRICS as SIMILARITY_METRICS
from service.graders.templates import check_template


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentedAs:
    """Validate as the annotated type but document the field as `shape` in the OpenAPI schema.

    Grader configs arrive as plain dicts so that `parse_grader` can name the exact bad field; the
    schema still tells clients (and schemathesis) the real shape, so what it allows is what we accept.
    """

    def __init__(self, shape: Any) -> None:
        self.shape = shape

    def __get_pydantic_json_schema__(self, _: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(TypeAdapter(self.shape).core_schema)


Name = Annotated[str, Field(min_length=1, max_length=128)]


class Templated(Strict):
    @field_validator("input", "reference", check_fields=False)
    @classmethod
    def _valid_templates(cls, text: str) -> str:
        return _template(text)


class StringCheckGrader(Templated):
    type: Literal["string_check"]
    name: Name
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(Templated):
    type: Literal["text_similarity"]
    name: Name
    input: str
    reference: str
    evaluation_metric: Literal[SIMILARITY_METRICS]  # type: ignore[valid-type]
    pass_threshold: Annotated[float, Field(ge=0, le=1, strict=True)] | None = None  # strict: JSON false is not 0


class PythonGrader(Strict):
    type: Literal["python"]
    name: Name
    source: str = Field(description="Python code with a top-level `def grade(sample, item) -> float`.")
    image_tag: str | None = None  # OpenAI's grader runtime image: refused, there is one environment here

    @field_validator("image_tag")
    @classmethod
    def _one_environment(cls, tag: str | None) -> None:
        if tag is not None:
            raise ValueError(
                f"{tag!r} cannot be chosen: python graders here run in this server's one grader environment "
                "(its packages: GET /v1/fine_tuning/alpha/graders/environment); leave image_tag out"
            )
        return None

    @field_validator("source")
    @classmethod
    def _valid_source(cls, source: str) -> str:
        from service.graders.sandbox import validate_source

        validate_source(source)
        return source


class InputText(Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a hosted-cache hint: no effect on a local judge


class OutputText(Strict):
    type: Literal["output_text"]
    text: str


class InputImage(Strict):
    type: Literal["input_image"]
    image_url: str
    detail: str | None = None


class InputAudio(Strict):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


# What OpenAI's SDK may send as a grader message's content, or as one item of a list of it. Text is
# templated and read; images and audio parse, then get a 400 (`_text_only`): local judges read text.
# The schema documents the text shapes only: what it allows is what we accept.
ContentPart = Annotated[InputText | OutputText | InputImage | InputAudio, Field(discriminator="type")]
Content = str | ContentPart | list[str | ContentPart]
TextPart = Annotated[InputText | OutputText, Field(discriminator="type")]
TextContent = str | TextPart | list[str | TextPart]


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Content, DocumentedAs(TextContent)]

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: Content) -> Content:
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            if isinstance(part, InputImage | InputAudio):
                raise ValueError(
                    f"{part.type} content is not supported: this server's grader models read text only; "
                    "send the content as a string, or as input_text / output_text parts"
                )
            _template(part if isinstance(part, str) else part.text)
        return content

    def text(self) -> str:
        """The content's text parts, joined in order (each templated)."""
        parts = self.content if isinstance(self.content, list) else [self.content]
        texts = (p if isinstance(p, str) else p.text for p in parts if isinstance(p, str | InputText | OutputText))
        return "".join(texts)


class SamplingParams(Strict):
    # strict: a JSON true is no temperature (lax pydantic would read it as 1.0); ints still pass as floats
    seed: Annotated[int, Field(strict=True)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, strict=True)] | None = None
    max_completions_tokens: Annotated[int, Field(ge=1, le=4096, strict=True)] | None = None
    # Every level OpenAI's SDK allows; what each does on a local judge: service/models/thinking.py.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None


class ScoreModelGrader(Strict):
    type: Literal["score_model"]
    name: Name
    model: str
    input: Annotated[list[InputMessage], Field(min_length=1)]
    range: tuple[Annotated[float, Field(strict=True)], Annotated[float, Field(strict=True)]] = (0.0, 1.0)
    sampling_params: SamplingParams | None = None

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(bounds)}")
        return bounds


class LabelModelGrader(Strict):
    type: Literal["label_model"]
    name: Name
    model: str
    input: Annotated[list[InputMessage], Field(min_length=1)]
    labels: Annotated[list[str], Field(min_length=1)]
    passing_labels: Annotated[list[str], Field(min_length=1)]
    sampling_params: SamplingParams | None = None

    @model_validator(mode="after")
    def _passing_are_labels(self) -> LabelModelGrader:
        unknown = [label for label in self.passing_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels {unknown} are not in labels {self.labels}")
        return self


SimpleGrader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader
SubGradersShape = Annotated[dict[str, Annotated[SimpleGrader, Field(discriminator="type")]], Field(min_length=1)]


class MultiGrader(Strict):
    type: Literal["multi"]
    name: Name
    graders: Annotated[dict[str, dict[str, Any]], Field(min_length=1), DocumentedAs(SubGradersShape)]
    calculate_output: str = Field(description="A formula over the graders' names, e.g. `0.5 * a + 0.5 * b`.")


GraderConfig = SimpleGrader | MultiGrader
# What a `grader` field holds, for the OpenAPI schema; `parse_grader` validates it.
GraderShape = DocumentedAs(Annotated[GraderConfig, Field(discriminator="type")])
MODELS: dict[str, type[BaseModel]] = {
    "string_check": StringCheckGrader,
    "text_similarity": TextSimilarityGrader,
    "python": PythonGrader,
    "score_model": ScoreModelGrader,
    "label_model": LabelModelGrader,
    "multi": MultiGrader,
}


def _template(text: str) -> str:
    check_template(text)
    return text


def parse_grader(data: Any, param: str = "grader", *, nested: bool = False) -> GraderConfig:
    """Validate a grader config; InvalidRequest names the exact field that is wrong."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{param} must be an object with a 'type' field.", param=param)
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in MODELS:  # a list or object is no type name (nor hashable)
        raise InvalidRequest(f"{param}.type is {kind!r}; expected one of {', '.join(MODELS)}.", param=f"{param}.type")
    if kind == "multi" and nested:
        raise InvalidRequest(
            "multi graders cannot contain multi graders; flatten them into one graders map.", param=f"{param}.type"
        )
    try:
        config: GraderConfig = MODELS[kind].model_validate(data)  # type: ignore[assignment]
    except ValidationError as exc:
        raise _invalid(exc, param) from None
    if isinstance(config, MultiGrader):
        for key, sub in config.graders.items():
            parse_grader(sub, f"{param}.graders.{key}", nested=True)
        try:
            Formula(config.calculate_output, set(config.graders))
        except FormulaError as exc:
            raise InvalidRequest(str(exc), param=f"{param}.calculate_output") from None
    return config


def sub_graders(config: MultiGrader) -> dict[str, SimpleGrader]:
    return {key: parse_grader(sub, nested=True) for key, sub in config.graders.items()}  # type: ignore[misc]


def _invalid(exc: ValidationError, param: str) -> InvalidRequest:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    where = f"{param}.{loc}" if loc else param
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized grader field: {where}", param=where)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required grader field: {where}", param=where)
    detail = str(first["msg"]).removeprefix("Value error, ")
    return InvalidRequest(f"Invalid value for '{where}': {detail}", param=where)


class ValidateRequest(Strict):
    grader: Annotated[dict[str, Any], GraderShape]


def _without_reference_answer(schema: dict[str, Any]) -> None:
    # Accepted only to be refused with where it goes now: not offered.
    schema["properties"].pop("reference_answer", None)


class RunRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_without_reference_answer)

    grader: Annotated[dict[str, Any], GraderShape]
    model_sample: str
    item: dict[str, Any] | None = None
    reference_answer: Any = None  # OpenAI's older run endpoint's; refused with where it goes now

    @field_validator("reference_answer")
    @classmethod
    def _in_item(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "reference_answer is no longer a field of /graders/run; put it in `item` "
                '(e.g. "item": {"reference_answer": ...}) and template it as {{item.reference_answer}}'
            )
        return None


class GraderPackage(BaseModel):
    name: str
    version: str


class SandboxLimitsObject(BaseModel):
    timeout_seconds: float
    memory_bytes: int
    tmp_bytes: int
    max_file_bytes: int
    max_processes: int
    max_open_files: int


class SandboxObject(BaseModel):
    available: bool
    reason: str | None  # why python graders are refused, when they are
    mechanism: str | None
    network: bool
    limits: SandboxLimitsObject


class GraderEnvironmentObject(BaseModel):
    object: Literal["fine_tuning.grader_environment"]
    python_version: str | None
    packages: list[GraderPackage]
    sandbox: SandboxObject
