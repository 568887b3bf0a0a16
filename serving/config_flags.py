"""Command-line flags generated from the config models: one flag per field, with its help and default.

Flags are named after their field (`max_num_seqs` -> `--max-num-seqs`), except `model.source`,
which is `--model`. A flag given on the command line overrides the YAML file of `--config`;
everything left out keeps the config's default, which lives in serving/config.py only.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from serving.config import LLMConfig

_FLAG_NAMES = {("model", "source"): "model"}
_DEST_PREFIX = "config."


def add_config_flags(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """Add `--config FILE` and a flag for every field of the given LLMConfig sections."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with an LLMConfig (the sections below); flags given here override it")
    for section in sections:
        model = _section_model(LLMConfig, section)
        group = parser.add_argument_group(f"{section} options", (model.__doc__ or "").strip())
        for path, field in _leaves(model, (section,)):
            _add_flag(group, path, field)


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LLMConfig:
    """The validated config: the --config file, overridden by the flags given; errors exit through `parser`."""
    data: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    for dest, value in vars(args).items():
        if dest.startswith(_DEST_PREFIX):
            *parents, name = dest[len(_DEST_PREFIX) :].split(".")
            node = data
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
    try:
        return LLMConfig.model_validate(data)
    except ValidationError as error:
        parser.error("invalid configuration:\n" + "\n".join(_describe(e) for e in error.errors()))


def _describe(error: Any) -> str:
    path = tuple(str(part) for part in error["loc"])
    return f"  {_flag(path) if len(path) > 1 else path[0]}: {error['msg']}"


def _section_model(root: type[BaseModel], section: str) -> type[BaseModel]:
    annotation = root.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def _leaves(model: type[BaseModel], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, (*path, name))
        else:
            yield (*path, name), field


def _flag(path: tuple[str, ...]) -> str:
    return "--" + _FLAG_NAMES.get(path, path[-1]).replace("_", "-")


def _add_flag(group: argparse._ArgumentGroup, path: tuple[str, ...], field: FieldInfo) -> None:
    """Values stay strings (pydantic converts and validates them); absent flags leave no attribute."""
    help_text = field.description or ""
    if field.default is not PydanticUndefined and field.default is not None:
        help_text += f" (default: {field.default})"
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    kwargs: dict[str, Any] = {"dest": _DEST_PREFIX + ".".join(path), "default": argparse.SUPPRESS, "help": help_text}
    kind = _without_none(field.annotation)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is Literal:
        kwargs["choices"] = typing.get_args(kind)
    else:
        kwargs["metavar"] = path[-1].upper()
    group.add_argument(_flag(path), **kwargs)


def _without_none(annotation: Any) -> Any:
    """X for `X | None`, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation
