"""Repository-level checks: the README and the scripts agree, and every script is safe to import.

- every numbered script in the repository is named in README.md (and in README.zh-CN.md);
- every script that a README command runs exists;
- importing a script has no side effects: no network, no argument parsing, no files written;
- every script answers --help, and every `python 0N_x.py ...` / `torchrun ... 0N_x.py ...` line in
  the READMEs' code blocks parses with that script's own parse_args (so the docs cannot drift).
"""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, load_script

READMES = [ROOT / "README.md", ROOT / "README.zh-CN.md"]
SCRIPTS = sorted(p.name for p in ROOT.glob("0[1-9]_*.py"))


def readme_commands():
    """(readme name, script name, argv) for each command line in a fenced code block or in an
    inline code span (the results tables name their commands that way)."""
    found = []
    for readme in READMES:
        text = readme.read_text(encoding="utf-8")
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
        for block in blocks + spans:
            for line in block.splitlines():
                for part in re.split(r"&&|;", line):  # `pip install ... && python 03_gpt.py`
                    words = shlex.split(part, comments=True)
                    scripts = [i for i, w in enumerate(words) if re.fullmatch(r"0\d_\w+\.py", w)]
                    if scripts and any(w in ("python", "python3", "torchrun") or w.endswith("torch.distributed.run")
                                       for w in words[:scripts[0]]):
                        i = scripts[0]
                        found.append((readme.name, words[i], words[i + 1:]))
    return found


def test_readmes_exist_and_link():
    for readme in READMES:
        assert readme.exists(), f"{readme.name} is missing"
    assert "README.zh-CN.md" in READMES[0].read_text(encoding="utf-8")


def test_there_are_scripts():
    assert SCRIPTS, "no 0N_*.py script has landed"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_every_script_is_in_the_readme(readme):
    text = readme.read_text(encoding="utf-8")
    missing = [s for s in SCRIPTS if s not in text]
    assert not missing, f"{readme.name} does not mention {missing}"


def test_readme_commands_name_existing_scripts():
    commands = readme_commands()
    assert any(s == "03_gpt.py" for _, s, _ in commands), "the README has no command running 03_gpt.py"
    for readme, script, _ in commands:
        assert (ROOT / script).exists(), f"{readme} runs {script}, which does not exist"


@pytest.mark.parametrize("readme,script,argv", readme_commands(),
                         ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_readme_command_parses(readme, script, argv):
    mod = load_script(script)
    try:
        cfg = mod.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{readme}: `{script} {' '.join(argv)}` does not parse (exit {e.code})")
    assert cfg is not None


# One subprocess imports every script with the network cut off, a flag no parser knows in sys.argv,
# and an empty working directory: it must end with no exception, no exit and no new files.
IMPORT_PROBE = r"""
import importlib.util, os, socket, sys
def no_network(*args, **kwargs):
    raise RuntimeError("a script touched the network at import time")
socket.socket.connect = no_network
socket.create_connection = no_network
sys.argv = ["probe", "--not-a-flag-of-any-script"]
for path in {paths!r}:
    name = "probe_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), path + " has no main()"
    assert callable(getattr(module, "parse_args", None)), path + " has no parse_args()"
print("imported", len({paths!r}))
"""


def test_import_has_no_side_effects(tmp_path):
    if not SCRIPTS:
        pytest.skip("no scripts yet")
    paths = [str(ROOT / s) for s in SCRIPTS]
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(paths=paths)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"imported {len(paths)}" in proc.stdout
    assert list(tmp_path.iterdir()) == [], f"importing wrote files: {list(tmp_path.iterdir())}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_field(script, capsys):
    mod = load_script(script)
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for field in mod.Config.__dataclass_fields__:
        assert f"--{field}" in out, f"{script} --help does not list --{field}"
