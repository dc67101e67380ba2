"""README.md as a test: every command it shows runs as written, against the demo.

The demo (`tally run`) runs on the test broker in a namespace of its own, with its HTTP
ports moved to free ones and its data in a temporary directory; each README command is
then run by bash in the project root, after the `export` lines seen before it, with
`127.0.0.1:8081/8082/8083` and `data/` rewritten to those ports and that directory.

What runs: every fenced block holding `$ command` lines (a trailing backslash continues a
command); the lines after a command, up to the next one, are its expected output. A block
right after `<!-- readme-test: skip ... -->` is not run (the comment says why).
Outputs are compared by shape (`same_shape`): numbers, dates and column widths may
differ, words may not; `...` stands for anything within a line, or alone on a line for
any number of lines. The demo's own output (the block after `<!-- readme-test: demo -->`)
is compared with what `tally run` prints first.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import project_root

pytestmark = pytest.mark.kafka

README = project_root() / "README.md"
FENCE = re.compile(r"^```")
NUMBER = re.compile(r"\d[\d,.:]*")
PORTS = {"8081": "TALLY_INGEST_PORT", "8082": "TALLY_PROJECTOR_PORT",
         "8083": "TALLY_ENFORCER_PORT"}


@dataclass(frozen=True)
class Example:
    command: str
    expected: list[str]
    line: int  # in README.md, for the failure message


@dataclass(frozen=True)
class Block:
    lines: list[str]
    line: int
    mark: str  # "" or what the readme-test comment before it says


def blocks(text: str) -> Iterator[Block]:
    lines = text.splitlines()
    i, mark = 0, ""
    while i < len(lines):
        if lines[i].startswith("<!-- readme-test:"):
            mark = lines[i].removeprefix("<!-- readme-test:").strip()
        elif FENCE.match(lines[i]):
            end = next(j for j in range(i + 1, len(lines)) if FENCE.match(lines[j]))
            yield Block(lines[i + 1:end], i + 2, mark)
            i, mark = end, ""
        elif lines[i].strip():
            mark = ""
        i += 1


def examples(block: Block) -> list[Example]:
    found: list[Example] = []
    lines, i = block.lines, 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if found:
                found[-1].expected.append(lines[i])
            i += 1
            continue
        start, command = i, lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        found.append(Example(command, [], block.line + start))
        i += 1
    return found


def normal(line: str) -> str:
    return " ".join(NUMBER.sub("0", line).split())


def same_shape(expected: list[str], actual: list[str]) -> bool:
    """`actual` has `expected`'s shape (see the module doc); blank lines at the ends and
    trailing comments (`# ...`) of the README are ignored."""
    want = [normal(line) for line in _trim(expected)]
    got = [normal(line) for line in _trim(actual)]
    return _match(want, got)


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def _match(want: list[str], got: list[str]) -> bool:
    if not want:
        return not got
    if want[0] == "...":
        return any(_match(want[1:], got[k:]) for k in range(len(got) + 1))
    if not got or not _line_matches(want[0], got[0]):
        return False
    return _match(want[1:], got[1:])


def _line_matches(want: str, got: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in want.split("..."))
    return re.fullmatch(pattern, got) is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rewrite(command: str, env: dict[str, str], data: Path) -> str:
    for port, name in PORTS.items():
        command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{env[name]}")
    return re.sub(r"(?<![\w/.])data/", f"{data}/", command)


def test_the_commands_of_the_readme_run_as_written(kafka_bootstrap: str, unique_name: str,
                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "TALLY_TOPIC_NAMESPACE": f"readme-{unique_name}", "TALLY_DATA_DIR": str(data),
           **{name: str(free_port()) for name in PORTS.values()}}
    env.pop("TALLY_API_KEY", None)
    all_blocks = list(blocks(README.read_text()))
    with Demo(env, tmp_path / "demo.out") as first_print:
        demo_block = next(b for b in all_blocks if b.mark.startswith("demo"))
        check_demo_output(demo_block, first_print)
        exports: list[str] = []
        ran = 0
        for block in all_blocks:
            if block.mark.startswith("skip"):
                continue
            for example in examples(block):
                command = rewrite(example.command, env, data)
                if command.startswith("export "):
                    exports.append(command)
                    continue
                done = subprocess.run(["bash", "-c", "; ".join([*exports, command])],
                                      cwd=project_root(), env=env, capture_output=True,
                                      text=True, timeout=120)
                # stdout, or stderr when that is all there is (stderr also carries
                # progress bars, which are not the README's business)
                shown = done.stdout if done.stdout.strip() else done.stderr
                output = shown.replace(str(data), "data").splitlines()
                assert "Traceback" not in done.stderr, (example.line, done.stderr)
                assert same_shape(example.expected, output), (
                    f"README.md:{example.line}: {example.command}\n--- expected\n"
                    + "\n".join(example.expected) + "\n--- got\n" + "\n".join(output))
                ran += 1
    assert ran >= 8  # the README's examples were found, not silently skipped


def check_demo_output(block: Block, printed: list[str]) -> None:
    """The README's table equals the first print's in shape; each alert line it shows was
    printed (alerts of several users may arrive over more than one print)."""
    cut = next(i for i, line in enumerate(block.lines) if line.startswith("== alerts"))
    table = [line for line in printed[:printed.index(next(
        line for line in printed if line.startswith("== alerts")))]]
    assert same_shape(block.lines[:cut], table), "\n".join(table)
    for line in block.lines[cut + 1:]:
        assert any(same_shape([line], [got]) for got in printed), (line, printed)


class Demo:
    """`tally run` in the background; yields its first print of the decisions and alerts
    once bob's limit alert is out. Ctrl-C (SIGINT) stops it, as in a terminal."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.env, self.out = env, out

    def __enter__(self) -> list[str]:
        self.handle = self.out.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "tally.cli", "run"],
                                        cwd=project_root(), env=self.env, stdout=self.handle,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "user_bob: limit 100% daily" not in self.out.read_text():
            assert self.process.poll() is None, self.out.read_text()
            assert time.monotonic() < deadline, self.out.read_text()
            time.sleep(0.2)
        namespace = self.env["TALLY_TOPIC_NAMESPACE"]
        lines = self.out.read_text().replace(f"{namespace}.", "").splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("== decisions"))
        return lines[start:]

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            logs = Path(self.env["TALLY_DATA_DIR"]) / "logs"
            tails = [f"--- {log.name}\n{log.read_text()[-1500:]}" for log in logs.glob("*.log")]
            raise AssertionError("`tally run` did not stop within 90 s of Ctrl-C:\n"
                                 + "\n".join([self.out.read_text()[-3000:], *tails])) from None
        finally:
            self.handle.close()


def test_same_shape_allows_numbers_and_widths_but_not_words() -> None:
    assert same_shape(["user_bob  26,000/25,000  2026-12-03T00:00:00+00:00"],
                      ["user_bob    41,000/500,000    2027-01-01T00:00:00+00:00"])
    assert not same_shape(["user_bob over_limit"], ["user_bob ok"])
    assert same_shape(["a", "...", "z"], ["a", "b", "c", "z"])
    assert same_shape(['{"users":[...]}'], ['{"users":[{"user_id":"x"}]}'])
    assert not same_shape(["a", "b"], ["a"])
