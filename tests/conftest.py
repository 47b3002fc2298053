"""Test harness shared by every tests/test_0N_*.py file.

The seven scripts are standalone files whose names start with a digit, so they cannot be imported
with a plain `import`; `load_script("03_gpt")` loads one by path. Importing a script must have no
side effects (no downloads, no argument parsing, no files written) -- tests/test_repo.py checks that.

Fixtures and helpers:
- load_script(name)            -> the script as a module, loaded once and cached
- script_section(name, first, end) -> the lines of a script from its first banner starting with
                                  `first` up to (not including) the first banner starting with `end`
- milestone_namespace(name)    -> the script's milestone section executed on its own, after only
                                  the file's import lines (what a reader who copies it gets)
- run_script(name, *args, ...) -> ScriptResult(returncode, output) of `python 0N_x.py args`
- run_torchrun(name, *args)    -> the same under `torchrun --standalone --nproc_per_node=2` (gloo)
- data_dir fixture             -> a function data_dir("tinyshakespeare") returning $LLM_DATA_DIR, or
                                  skipping the test when the variable or that dataset is missing
- http_server fixture          -> a function http_server(folder) serving a folder on 127.0.0.1 and
                                  returning its base URL (download tests; never the real network)
"""
import functools
import http.server
import importlib.util
import linecache
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script_path(name):
    """'03_gpt' or '03_gpt.py' -> the path of that script at the repository root."""
    stem = name[:-3] if name.endswith(".py") else name
    return ROOT / f"{stem}.py"


@functools.lru_cache(maxsize=None)
def load_script(name):
    """Import a numbered script by path, once. The module is registered in sys.modules under a
    valid identifier (`script_03_gpt`) so that pickling, dataclasses and torch.compile work."""
    path = script_path(name)
    if not path.exists():
        pytest.skip(f"{path.name} has not landed yet")
    mod_name = "script_" + path.stem
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def script_section(name, first, end=None):
    """Lines of a script from the first line starting with `first` to the first later line
    starting with `end` (or to the `if __name__` guard, or the end of the file)."""
    lines = script_path(name).read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(first)), None)
    if start is None:
        pytest.fail(f"{name} has no line starting with {first!r}")
    stops = (end,) if end else ("if __name__",)
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(stops)), len(lines))
    return lines[start:stop]


def milestone_namespace(name):
    """Execute the milestone section (from the first `# --- Milestone` banner to `# --- Data`)
    in a fresh namespace that holds only the file's own top-level import lines."""
    import ast
    source = script_path(name).read_text(encoding="utf-8")
    imports = [ast.get_source_segment(source, node) for node in ast.parse(source).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    section = "\n".join(script_section(name, "# --- Milestone", "# --- Data"))
    ns = {"__name__": f"milestone_{script_path(name).stem}"}
    sys.modules[ns["__name__"]] = type(sys)(ns["__name__"])  # dataclasses look their module up
    code = "\n".join(imports) + "\n" + section
    filename = f"<{name} milestone section>"
    # @triton.jit reads its kernel's source: give the exec'd text a source as a real file has
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exec(compile(code, filename, "exec"), ns)
    sys.modules[ns["__name__"]].__dict__.update(ns)
    return ns


@dataclass
class ScriptResult:
    returncode: int
    output: str  # stdout and stderr interleaved, as a user would see them

    def __str__(self):
        return f"exit {self.returncode}\n{self.output[-4000:]}"

    __repr__ = __str__  # pytest shows repr() in a failed assert's message: show the output's end


def _env(extra=None):
    env = dict(os.environ)
    # Tests run on 2 cores next to each other: one intra-op thread per process keeps them from
    # oversubscribing the machine and keeps CPU runs bit-for-bit repeatable.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # Any accidental network access fails fast instead of hanging a test.
    env.setdefault("NO_PROXY", "127.0.0.1,localhost")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name, *args, timeout=120, cwd=None, env=None):
    """Run `python 0N_x.py *args` and return its exit code and combined output."""
    cmd = [sys.executable, str(script_path(name)), *map(str, args)]
    return _run(cmd, timeout, cwd, env)


def run_torchrun(name, *args, nproc=2, timeout=180, cwd=None, env=None):
    """Run a script under torchrun with `nproc` CPU ranks (DDP on gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script_path(name)), *map(str, args)]
    return _run(cmd, timeout, cwd, env)


def _run(cmd, timeout, cwd, env):
    try:
        proc = subprocess.run(cmd, cwd=cwd or ROOT, env=_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\n{out[-4000:]}")
    return ScriptResult(proc.returncode, proc.stdout)


@pytest.fixture
def data_dir():
    """data_dir("sst2") -> Path($LLM_DATA_DIR), skipping unless that dataset folder is there."""
    def get(dataset=None):
        root = os.environ.get("LLM_DATA_DIR")
        if not root:
            pytest.skip("LLM_DATA_DIR is not set: no offline copy of the real datasets")
        root = Path(root)
        if dataset and not (root / dataset).exists():
            pytest.skip(f"{root / dataset} does not exist")
        return root
    return get


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """http_server(folder) -> "http://127.0.0.1:PORT" serving that folder until the test ends."""
    servers = []

    def start(folder):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
