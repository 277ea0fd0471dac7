"""Every shell command and Python snippet in README.md and docs/*.md, run as written.

How. Each page's fenced blocks are taken in order: ```bash / ```sh blocks run in bash (`-e -o pipefail`),
```python blocks with the interpreter, ```yaml / ```json blocks must parse. All pages share one sandbox
folder, in the order README, TRAINING, CONFIG, DEPLOY, DISTRIBUTED, then the other pages by name, so a page
finds what the pages before it made (`runs/demo/adapter`, `runs/chats/adapter`), as a reader who follows
them would. The sandbox holds a copy of docs/examples/, `scripts/`, and `.venv/bin/` with `python`,
`lorakit` and `torchrun` that run this interpreter with this checkout's `src/` (CI runs the suite from a
fresh clone's `.venv`; any other venv works the same), so commands run exactly as written, from the
"repository root".

Quick mode (LORAKIT_DOCS_QUICK=1, set here; the sandbox's `lorakit` and `torchrun` read it): every
`lorakit train` / `train-multi` command gets `QUICK` appended (later overrides win: 2 steps, a 32-date
demo with 4 held out, batch 2 of at most 128 tokens), plus `val_size=4` where the command or its YAML file
sets `val_size`; docs/examples/chats.jsonl holds its first 24 chats; a page that starts a server serves
on a free port in place of 8000 (in every block of that page). Everything else runs unchanged.

Markers: an HTML comment on the line right before a block.
  <!-- docs-test: skip (REASON) -->  not run here: a GPU, software not installed here, an hour-long
                                     benchmark. The reason is required.
  <!-- docs-test: server -->         the block starts a server: it runs in the background until it prints
                                     "serving on"; the page's later blocks run against it; it is stopped at
                                     the end of the page.
  <!-- docs-test: same (FILE) -->    a YAML block that must load to the same data as FILE.

Not run: README's first block. Its second line is CI's own command (`.ci/run`); its first would reinstall
the venv. The demo run at its end, `.venv/bin/lorakit train`, is the sandbox's first step and is checked
(`test_demo_first_run`). The commands run on the default model: the tests that run them are `slow`
(about 10 minutes on 2 idle cores; `-m "not slow"` leaves the marker and style checks only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIRST = ["README.md", "docs/TRAINING.md", "docs/CONFIG.md", "docs/DEPLOY.md", "docs/DISTRIBUTED.md"]
QUICK = ["max_steps=2", "demo_train=32", "demo_eval=4", "batch_size=2", "max_length=128", "warmup_steps=1"]
QUICK_CHATS = 24  # chats kept in the sandbox's docs/examples/chats.jsonl
MARKER = re.compile(r"^[ \t]*<!--\s*docs-test:\s*(.*?)\s*-->[ \t]*$", re.M)  # a line of its own
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
RUNNABLE = {"bash": "shell", "sh": "shell", "python": "python", "yaml": "yaml", "json": "json"}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    kind: str  # shell, python, yaml, json
    text: str
    marker: str | None = None  # skip, server, same
    arg: str = ""  # the reason of a skip, the file of a same

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_marker(text: str, where: str) -> tuple[str, str]:
    """`skip (REASON)`, `server` or `same (FILE)` -> (kind, argument); anything else is an error."""
    m = re.fullmatch(r"(\w+)(?:\s*\((.*)\))?", text, flags=re.S)
    kind, arg = (m.group(1), (m.group(2) or "").strip()) if m else (text, "")
    if kind == "skip" and not arg:
        raise ValueError(f"{where}: docs-test skip without a reason: write <!-- docs-test: skip (REASON) -->")
    if kind == "same" and not arg:
        raise ValueError(f"{where}: docs-test same without a file: write <!-- docs-test: same (FILE) -->")
    if kind not in ("skip", "server", "same") or (kind == "server" and arg):
        raise ValueError(f"{where}: unknown docs-test marker {text!r} (skip (REASON), server, same (FILE))")
    return kind, arg


def blocks_of(page: str, text: str) -> list[Block]:
    """The runnable blocks of a page, each with the marker on the line right before its fence. A marker
    anywhere else is an error (it would silently mark nothing)."""
    found, used = [], set()
    for m in FENCE.finditer(text):
        line = text[: m.start()].count("\n") + 1
        before = text[: max(0, m.start() - 1)].rsplit("\n", 1)[-1] if line > 1 else ""
        marker = MARKER.fullmatch(before)
        kind = RUNNABLE.get(m.group(1))
        if marker:
            used.add(line - 1)
        if kind is None:
            if marker:
                raise ValueError(f"{page}:{line}: docs-test marker before a block that is not run ({m.group(1)!r})")
            continue
        block = Block(page, line, kind, m.group(2))
        if marker:
            block.marker, block.arg = parse_marker(marker.group(1), f"{page}:{line - 1}")
        found.append(block)
    for m in MARKER.finditer(text):
        line = text[: m.start()].count("\n") + 1
        if line not in used:
            raise ValueError(f"{page}:{line}: docs-test marker not on the line right before a ``` block")
    return found


def pages() -> list[str]:
    rest = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    return [p for p in FIRST if (ROOT / p).is_file()] + [p for p in rest if p not in FIRST]


def page_blocks(page: str) -> list[Block]:
    found = blocks_of(page, (ROOT / page).read_text())
    return found[1:] if page == "README.md" else found  # README's first block: see the module docstring


# ----------------------------------------------------------------------------- fast checks (no model)


def test_marker_rules():
    page = "```bash\necho a\n```\n<!-- docs-test: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n"
    assert [b.line for b in blocks_of("p.md", page)] == [1, 5]
    assert [(b.marker, b.arg) for b in blocks_of("p.md", page)] == [(None, ""), ("skip", "needs a GPU")]
    with pytest.raises(ValueError, match="p.md:2: docs-test skip without a reason"):
        blocks_of("p.md", "text\n<!-- docs-test: skip -->\n```bash\nnvidia-smi\n```\n")
    with pytest.raises(ValueError, match="p.md:2: docs-test skip without a reason"):
        blocks_of("p.md", "text\n<!-- docs-test: skip () -->\n```bash\nnvidia-smi\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test marker 'skipp"):
        blocks_of("p.md", "<!-- docs-test: skipp (typo) -->\n```bash\nx\n```\n")
    with pytest.raises(ValueError, match="p.md:1: docs-test marker not on the line right before"):
        blocks_of("p.md", "<!-- docs-test: skip (gpu) -->\n\ntext\n```bash\nx\n```\n")


def test_every_page_parses_and_every_skip_gives_a_reason():
    for page in pages():
        for block in blocks_of(page, (ROOT / page).read_text()):  # raises on a bad marker
            assert block.marker != "skip" or len(block.arg) >= 8, f"{block.where}: say why it cannot run here"


def test_commands_call_the_venv_tools():
    """One way to call the tools throughout the docs: `.venv/bin/lorakit`, `.venv/bin/python`, ..."""
    bare = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(lorakit|python3?|torchrun|pip3?|pytest)\b")
    for page in pages():
        for block in page_blocks(page):
            if block.kind != "shell":
                continue
            for i, line in enumerate(block.text.splitlines(), 1):
                for part in re.split(r"&&|\|\||;|\|", line):
                    assert not bare.match(part.strip()), f"{block.where}+{i}: call .venv/bin/{part.split()[0]}"


def test_yaml_and_json_blocks_parse_and_copies_match_their_files():
    for page in pages():
        for block in page_blocks(page):
            if block.kind == "json":
                json.loads(block.text)
            elif block.kind == "yaml":
                data = yaml.safe_load(block.text)
                if block.marker == "same":
                    assert data == yaml.safe_load((ROOT / block.arg).read_text()), f"{block.where} != {block.arg}"


def test_examples_are_valid_configs():
    from lorakit.config import load_jobs_config, load_train_config

    cfg = load_train_config(ROOT / "docs/examples/my.yaml")
    assert cfg.dataset == "docs/examples/chats.jsonl" and cfg.output_dir == "runs/my"
    jobs = load_jobs_config(ROOT / "docs/examples/jobs.yaml")
    assert [j.output_dir for j in jobs] == ["runs/multi/dates", "runs/multi/chats"] and jobs[0].lora.r == 16
    readme = (ROOT / "README.md").read_text()
    assert "docs/examples/my.yaml" in readme and "docs/examples/jobs.yaml" in readme


# ----------------------------------------------------------------------------- the sandbox


LORAKIT = '''#!{python}
"""lorakit, with the docs tests' quick mode (tests/test_doc_commands.py)."""
import sys
sys.path.insert(0, {tests!r})
from test_doc_commands import quick_args
sys.argv[1:] = quick_args(sys.argv[1:])
from lorakit.cli import main
sys.exit(main())
'''
TORCHRUN = '''#!{python}
"""torchrun, with the docs tests' quick mode (tests/test_doc_commands.py)."""
import os, sys
sys.path.insert(0, {tests!r})
from test_doc_commands import quick_args
args = sys.argv[1:]
at = next((i for i in range(len(args) - 1) if args[i:i + 2] == ["-m", "lorakit"]), None)
if at is not None:
    args = args[:at + 2] + quick_args(args[at + 2:])
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *args])
'''


def quick_args(args: list[str]) -> list[str]:
    """`lorakit ARGS` in quick mode: QUICK appended to `train` / `train-multi` (not to --print-config), and
    val_size=4 where the command or its YAML file sets val_size."""
    if os.environ.get("LORAKIT_DOCS_QUICK") != "1" or not args or args[0] not in ("train", "train-multi"):
        return args
    if "--print-config" in args:
        return args
    files = [Path(a) for a in args if a.endswith((".yaml", ".yml")) and Path(a).is_file()]
    sets_val = any(a.startswith("val_size=") for a in args) or any("val_size" in f.read_text() for f in files)
    return [*args, *QUICK, *(["val_size=4"] if sets_val else [])]


def write_tool(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """The "repository root" the docs' commands run in (see the module docstring)."""
    root = tmp_path_factory.mktemp("docs-sandbox")
    shutil.copytree(ROOT / "docs" / "examples", root / "docs" / "examples")
    chats = root / "docs" / "examples" / "chats.jsonl"
    chats.write_text("".join(chats.read_text().splitlines(keepends=True)[:QUICK_CHATS]))
    (root / "scripts").symlink_to(ROOT / "scripts")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fill = {"python": sys.executable, "tests": str(ROOT / "tests")}
    write_tool(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    write_tool(bin_dir / "lorakit", LORAKIT.format(**fill))
    write_tool(bin_dir / "torchrun", TORCHRUN.format(**fill))
    return root


def environment(sandbox: Path) -> dict[str, str]:
    env = dict(os.environ, LORAKIT_DOCS_QUICK="1")
    env["PATH"] = f"{sandbox / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_shell(text: str, sandbox: Path, where: str, timeout: int = 3600) -> str:  # a guard against hangs
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=sandbox, env=environment(sandbox),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{where}: exit status {proc.returncode}\n{text}\n--- stdout\n{proc.stdout[-3000:]}\n"
                    f"--- stderr\n{proc.stderr[-5000:]}", pytrace=False)
    return proc.stdout + proc.stderr


def run_python(text: str, sandbox: Path, where: str) -> str:
    path = sandbox / "snippet.py"
    path.write_text(text)
    return run_shell(f".venv/bin/python {path.name}", sandbox, where)


@pytest.fixture(scope="module")
def demo(sandbox) -> str:
    """README's first command after the set-up: the demo run (quick), and what it printed."""
    return run_shell(".venv/bin/lorakit train", sandbox, "README.md:4 (the demo)")


class Server:
    """A block that starts a server, run in the background until it says it is serving."""

    def __init__(self, block: Block, text: str, sandbox: Path) -> None:
        self.block, self.lines = block, []
        self.proc = subprocess.Popen(["bash", "-e", "-c", text], cwd=sandbox, env=environment(sandbox),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while not any("serving on" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{block.where}: the server did not start\n{text}\n{''.join(self.lines)[-5000:]}",
                            pytrace=False)
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What each page promises to leave behind (paths in the sandbox) and to print, checked after its blocks.
PROMISED_FILES = {
    "README.md": ["out/adapter/adapter_config.json", "runs/demo/merged/config.json", "runs/demo/merged/tokenizer.json",
                  "runs/my/adapter/adapter_model.safetensors"],
    "docs/TRAINING.md": ["runs/chats/adapter/adapter_config.json", "runs/chats/adapter/adapter_model.safetensors",
                         "runs/chats/metrics.jsonl", "runs/chats/results.json", "runs/chats/loss.png",
                         "runs/chats/merged/config.json", "runs/chats/merged/tokenizer.json"],
    "docs/CONFIG.md": ["runs/longlora/adapter/adapter_config.json", "runs/multi/dates/adapter/adapter_config.json",
                       "runs/multi/chats/adapter/adapter_config.json", "runs/multi/chats/results.json"],
    "docs/DEPLOY.md": ["runs/demo/merged.gguf", "runs/demo/adapter.gguf"],
    "docs/DISTRIBUTED.md": ["runs/my/adapter/adapter_config.json"],
}
PROMISED_OUTPUT = {
    "README.md": ["exact match:", "trainable params:", "merged model written to runs/demo/merged"],
    "docs/TRAINING.md": [f"({QUICK_CHATS} examples: every row of docs/examples/chats.jsonl",
                         "(4 examples: the held-out rows of the run in runs/chats)",
                         "wrote runs/chats/loss.png"],
    "docs/DEPLOY.md": ['"dates"', '"dates-copy"', '"chat.completion"', '"text_completion"'],
}


def run_page(page: str, sandbox: Path) -> str:
    blocks = page_blocks(page)
    server_at = next((i for i, b in enumerate(blocks) if b.marker == "server"), None)
    port = free_port() if server_at is not None else None
    server, printed = None, []
    try:
        for i, block in enumerate(blocks):
            if block.marker == "skip" or block.kind in ("yaml", "json"):  # yaml/json: parsed in the fast tests
                continue
            text = block.text
            if port is not None and i >= server_at:
                text = re.sub(r"(?<=[ :])8000\b", str(port), text)
            if block.marker == "server":
                server = Server(block, text, sandbox)
            elif block.kind == "python":
                printed.append(run_python(text, sandbox, block.where))
            else:
                printed.append(run_shell(text, sandbox, block.where))
    finally:
        if server is not None:
            server.stop()
    return "".join(printed)


@pytest.mark.slow
def test_demo_first_run(sandbox, demo):
    """`lorakit train`: the files README promises, the rank it names, and the next steps it prints, which run."""
    run = sandbox / "runs" / "demo"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    rank = re.search(r"trains a rank-(\d+) LoRA on every linear layer", (ROOT / "README.md").read_text())
    assert rank and int(rank.group(1)) == config["r"]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and {"exact_match_before", "exact_match_after"} <= set(results)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("  adapter  runs/demo/adapter/", "  metrics  runs/demo/metrics.jsonl, runs/demo/results.json",
                 "  plot     runs/demo/loss.png"):
        assert line in demo.splitlines()
    after = demo.split("\nnext:\n", 1)[1].splitlines()[:3]
    assert after[0].strip() == ".venv/bin/lorakit eval runs/demo/adapter"
    assert after[1].strip().startswith(".venv/bin/lorakit generate --adapter runs/demo/adapter 'Convert the date")
    assert after[2].strip() == ".venv/bin/lorakit serve --adapters demo=runs/demo/adapter"
    printed = run_shell("\n".join(a.strip() for a in after[:2]), sandbox, "the printed next steps")
    assert "exact match:" in printed


@pytest.mark.slow
@pytest.mark.parametrize("page", pages())
def test_page_commands_run(page, sandbox, demo):
    printed = run_page(page, sandbox)
    for path in PROMISED_FILES.get(page, []):
        assert (sandbox / path).is_file(), f"{page}: {path} is missing"
    for text in PROMISED_OUTPUT.get(page, []):
        assert text in printed, f"{page}: the output does not say {text!r}"
    if page == "docs/TRAINING.md":
        results = json.loads((sandbox / "runs/chats/results.json").read_text())
        assert results["steps"] == 2 and {"exact_match_before", "exact_match_after", "best_val_loss"} <= set(results)
