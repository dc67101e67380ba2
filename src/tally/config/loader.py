"""One loader for auth.yaml, users.yaml and budgets.yaml.

`load_config(directory)` reads the three files of a config directory into a frozen Config:

- budgets.yaml is required: without it there is no budget to enforce;
- a missing auth.yaml means the AuthFile defaults (authentication enabled, method api_key,
  user_id_claim "sub");
- a missing users.yaml means no users (so an override or role naming a user is an error).

It does not stop at the first mistake: every problem in every file (YAML syntax, unknown
keys, wrong types, bad values, references across files) is collected and raised together as
one ConfigError, each as "file: key.path: reason".

`tally config check DIR` (`main`) prints "ok", or the problems to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tally.config.errors import ConfigError, ConfigProblem
from tally.config.models import (
    AUTH_FILE,
    BUDGETS_FILE,
    UNION_TAGS,
    USERS_FILE,
    AuthFile,
    BudgetsFile,
    Config,
    UsersFile,
    reference_problems,
    user_problems,
)

__all__ = ["USAGE", "ConfigWatcher", "LiveConfig", "load_config", "main"]

log = logging.getLogger(__name__)

USAGE = "usage: tally config check DIR"
FILE_ORDER = (AUTH_FILE, USERS_FILE, BUDGETS_FILE)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Loaded = tuple[M | None, list[ConfigProblem]]


def load_config(directory: Path) -> Config:
    """Read and check the config directory; raise ConfigError listing every problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError([ConfigProblem(str(directory), "", "not a directory")])
    auth, problems = _load(directory, AUTH_FILE, AuthFile, AuthFile())
    users, more = _load(directory, USERS_FILE, UsersFile, UsersFile())
    problems += more
    budgets, more = _load(directory, BUDGETS_FILE, BudgetsFile, None)
    problems += more
    if auth is not None:
        auth, more = _resolve_key_file(auth, directory)
        problems += more
    problems += _cross_checks(users, budgets)
    if problems or auth is None or users is None or budgets is None:
        raise ConfigError(sorted(problems, key=_file_rank))
    return Config(auth=auth, users=users, budgets=budgets)


def _cross_checks(users: UsersFile | None, budgets: BudgetsFile | None) -> list[ConfigProblem]:
    # Run whatever checks the files that did parse allow, so one bad file hides nothing else.
    problems = user_problems(users) if users is not None else []
    if users is not None and budgets is not None:
        problems += reference_problems(users, budgets)
    return problems


def _file_rank(problem: ConfigProblem) -> int:
    # A stable sort keeps each file's problems in the order they were found.
    return FILE_ORDER.index(problem.file) if problem.file in FILE_ORDER else len(FILE_ORDER)


# one file -----------------------------------------------------------------------------------


def _load(directory: Path, name: str, model: type[M], default: M | None) -> Loaded[M]:
    """The file as a model, or None and why not; `default` stands in for a missing file."""
    path = directory / name
    if not path.exists():
        if default is not None:
            return default, []
        return None, [ConfigProblem(name, "", f"missing: no {name} in {directory}")]
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        return None, [ConfigProblem(name, "", _yaml_reason(error))]
    except (OSError, UnicodeDecodeError) as error:
        return None, [ConfigProblem(name, "", f"cannot read: {error}")]
    return _validate(name, model, {} if data is None else data)


def _validate(name: str, model: type[M], data: Any) -> Loaded[M]:
    try:
        return model.model_validate(data), []
    except ValidationError as error:
        return None, [
            ConfigProblem(name, _key_path(detail["loc"]), _reason(detail))
            for detail in error.errors()
        ]


def _resolve_key_file(auth: AuthFile, directory: Path) -> Loaded[AuthFile]:
    """Make public_key_file absolute (relative to the config dir) and check it exists."""
    authentication = auth.authentication
    if authentication.public_key_file is None:
        return auth, []
    path = (directory / authentication.public_key_file).resolve()
    if not path.is_file():
        reason = f"no such file: {path}"
        return auth, [ConfigProblem(AUTH_FILE, "authentication.public_key_file", reason)]
    resolved = authentication.model_copy(update={"public_key_file": str(path)})
    return auth.model_copy(update={"authentication": resolved}), []


# YAML ---------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a repeated key; plain YAML silently keeps the last one."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        # Only plain keys written in this mapping: a key may legitimately override a `<<` merge.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r}", key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_reason(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


# pydantic errors -> key path and reason -----------------------------------------------------


def _key_path(loc: Sequence[int | str]) -> str:
    """("user_identification", "users", 1, "api_key") -> "user_identification.users[1].api_key"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for a bad mapping key (not its value)
            path += " (key)"
        elif part in UNION_TAGS:  # which form of a value was tried: not a key of the file
            continue
        else:
            path += f".{part}" if path else part
    return path


def _kind_of(value: object) -> str:
    # YAML words, not Python ones: the reader wrote YAML.
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    names |= {list: "list", dict: "mapping", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)


def _bound(word: str, key: str) -> Callable[[ErrorDetails], str]:
    def reason(detail: ErrorDetails) -> str:
        bound = detail.get("ctx", {})[key]
        if bound == 0 and key == "ge":
            return f"must not be negative, got {detail['input']}"
        return f"must be {word} {bound}, got {detail['input']}"

    return reason


_REASONS: dict[str, Callable[[ErrorDetails], str]] = {
    "extra_forbidden": lambda d: "unknown key",
    "missing": lambda d: "required key is missing",
    "value_error": lambda d: str(d.get("ctx", {})["error"]),
    "literal_error": lambda d: f"must be {d.get('ctx', {})['expected']}, got {d['input']!r}",
    "greater_than_equal": _bound("at least", "ge"),
    "less_than_equal": _bound("at most", "le"),
    "string_too_short": lambda d: "must not be empty",
    "model_type": lambda d: f"expected a mapping of keys, got {_kind_of(d['input'])}",
    "dict_type": lambda d: f"expected a mapping of keys, got {_kind_of(d['input'])}",
}


def _reason(detail: ErrorDetails) -> str:
    kind = detail["type"]
    if kind in _REASONS:
        return _REASONS[kind](detail)
    if kind.endswith("_type"):  # int_type, bool_type, tuple_type...; never echo the value
        expected = detail["msg"].removeprefix("Input should be ")
        return f"wrong type: expected {expected}, got {_kind_of(detail['input'])}"
    return detail["msg"]


# tally config check DIR ---------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """`tally config check DIR`: 0 and "ok", 1 and the problems on stderr, 2 on bad usage."""
    from tally.cli import parse

    try:
        args = parse(["config", *argv])
    except SystemExit as done:  # --help (0) or bad usage (2): argparse printed why
        return int(done.code or 0)
    return run(args)


def run(args: argparse.Namespace) -> int:
    try:
        load_config(args.dir)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    print("ok")
    return 0


class ConfigWatcher:
    """Notices a changed config file and loads it; a bad file keeps the old config."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[float, ...]:
        names = ("auth.yaml", "users.yaml", "budgets.yaml")
        paths = [self.directory / name for name in names]
        return tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in paths)

    def changed_config(self) -> Config | None:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            config = load_config(self.directory)
        except ConfigError as error:
            log.error("refusing the changed config in %s; the old one stays:\n%s",
                      self.directory, error)
            return None
        log.info("reloaded the config from %s", self.directory)
        return config


class LiveConfig:
    """The config a service runs under, followed while it runs (`follow`): a changed file
    replaces `current` (a bad one is refused and the old config stays), and what a service
    builds from the config (`derived`) is rebuilt once per new config, so a key revoked in
    users.yaml stops working at every port within a second, without a restart."""

    def __init__(self, config: Config, directory: Path | None) -> None:
        self.current = config
        self._watcher = ConfigWatcher(directory) if directory is not None else None

    def refresh(self) -> Config | None:
        """Look at the files once: the new config if they changed and load."""
        if self._watcher is None or (config := self._watcher.changed_config()) is None:
            return None
        self.current = config
        return config

    def derived(self, build: Callable[[Config], T]) -> Callable[[], T]:
        """`build` of the current config, built again only when the config changed."""
        built: list[tuple[Config, T]] = []

        def current() -> T:
            config = self.current
            if not built or built[0][0] is not config:
                built[:] = [(config, build(config))]
            return built[0][1]

        return current

    async def follow(self, on_change: Callable[[Config], Awaitable[None]] | None = None,
                     every: float = 1.0) -> None:
        """Until cancelled: refresh every `every` seconds, telling `on_change` of a new
        config (the projector recuts its periods on one)."""
        while True:
            await asyncio.sleep(every)
            if (config := self.refresh()) is not None and on_change is not None:
                await on_change(config)
