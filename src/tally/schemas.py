"""`tally schemas write|check [--dir DIR]`: the JSON Schema files, generated from tally.wire,
and the AsyncAPI document of every topic (asyncapi.json, from tally.asyncapi). DIR:
`schemas` in the working directory by default, the checkout's own when run there."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tally.cli import command_main
from tally.wire import WIRE_MODELS

__all__ = ["main", "render_all", "stale_files"]


def render_all() -> dict[str, str]:
    """File name -> text: the JSON Schema of every wire model, and the AsyncAPI document
    of every topic and message (asyncapi.json, tally.asyncapi)."""
    from tally.asyncapi import render  # FastStream's import only for this command

    schemas = {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        + "\n"
        for name, model in WIRE_MODELS.items()
    }
    return schemas | {"asyncapi.json": render()}


def stale_files(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from what the models generate."""
    return [
        name
        for name, text in render_all().items()
        if not (directory / name).exists() or (directory / name).read_text() != text
    ]


def write_all(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (directory / name).write_text(text)


def run(args: argparse.Namespace) -> int:
    directory = args.dir
    if args.action == "write":
        write_all(directory)
        print(f"wrote {len(WIRE_MODELS)} schemas and asyncapi.json to {directory}")
        return 0
    stale = stale_files(directory)
    for name in stale:
        print(f"stale: {directory / name} (run `tally schemas write`)", file=sys.stderr)
    return 1 if stale else 0


main = command_main("schemas")
