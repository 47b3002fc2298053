"""Repository-level checks: the README and the scripts agree, and every script is safe to import.

- every numbered script in the repository is named in README.md (and in README.zh-CN.md);
- every script that a README command runs exists;
- importing a script has no side effects: no network, no argument parsing, no files written;
- the plumbing section (`# --- Plumbing: the same in every script`) is byte-identical in all
  scripts, and each script's milestone section runs on its own (tests/test_repo.py's
  MILESTONE_CHECKS build and run its main classes after only the file's import lines);
- every script answers --help, and every `python 0N_x.py ...` / `torchrun ... 0N_x.py ...` line in
  the READMEs' code blocks parses with that script's own parse_args (so the docs cannot drift).
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, load_script, milestone_namespace, run_torchrun, script_section

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


PLUMBING_BANNER = "# --- Plumbing: the same in every script"


def test_plumbing_is_identical_in_every_script():
    sections = {s: script_section(s, PLUMBING_BANNER) for s in SCRIPTS}
    first = SCRIPTS[0]
    for script, lines in sections.items():
        assert lines == sections[first], (
            f"{script}'s plumbing differs from {first}'s: first differing line "
            f"{next((a, b) for a, b in zip(lines + [''] * 999, sections[first] + [''] * 999) if a != b)}")


def test_figures_are_optional_and_written_whole(tmp_path, monkeypatch, capsys):
    # the plumbing's pyplot/save_png, which every script's figures go through (identical in all seven)
    mod = load_script(SCRIPTS[0])
    if importlib.util.find_spec("matplotlib"):
        plt = mod.pyplot("fig.png")
        fig, ax = plt.subplots(figsize=(9, 5))
        ax.plot([0, 1], [1, 0])
        mod.save_png(fig, str(tmp_path / "fig.png"))
        png = (tmp_path / "fig.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 900  # 9 in x 100 dpi
        assert os.listdir(tmp_path) == ["fig.png"] and not plt.fignum_exists(fig.number)  # renamed, closed
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: a hint, no figure, no error
    assert mod.pyplot("fig.png") is None
    assert "pip install matplotlib to get fig.png" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_plumbing_comes_last_and_main_guard_closes_the_file(script):
    lines = (ROOT / script).read_text(encoding="utf-8").rstrip("\n").splitlines()
    assert lines[-2:] == ['if __name__ == "__main__":', "    main()"], f"{script} does not end with the main guard"
    banners = [line.split("---")[1].strip() for line in lines if line.startswith("# --- ")]
    assert banners[-1].startswith("Plumbing"), f"{script}: the plumbing is not the last section ({banners})"
    assert banners[0] == "Config" and banners[1].startswith("Milestone"), f"{script}: sections are {banners}"


# --- Bad input: the kinds every script shares (issue #16). Each case must end with exactly one
# `error:` line naming the flag or file, a non-zero exit, and no traceback (an exception other than
# SystemExit fails the test).
BAD_FLAGS = [("--device=nope", 1, "--device nope"), ("--learning_rate=-1", 2, "--learning_rate"),
             ("--eval_interval=0", 2, "--eval_interval"), ("--batch_size=0", 2, "--batch_size"),
             ("--mode=nope", 2, "--mode"), ("--learning_rate=nan", 2, "--learning_rate"),
             ("--seed=x", 2, "--seed"), ("--no_such_flag=1", 2, "--no_such_flag")]


def one_error(capsys, script, argv, status, needle):
    mod = load_script(script)
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == status, f"{script} {argv}: exit {e.value.code}, expected {status}\n{err}"
    assert len(errors) == 1 and needle in errors[0], f"{script} {argv}: {err!r}"
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag,status,needle", BAD_FLAGS, ids=[f for f, _, _ in BAD_FLAGS])
def test_bad_flag_values_give_one_error_line(script, flag, status, needle, tmp_path, capsys):
    one_error(capsys, script, ["--preset", "tiny", flag, f"--out_dir={tmp_path}"], status, needle)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_reported_by_rank_0_only(script, capsys, monkeypatch):
    # torchrun starts every rank with the same flags: one error line, not one per rank; all exit 2
    mod = load_script(script)
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            mod.main(["--no_such_flag=1"])
        assert e.value.code == 2 and capsys.readouterr().err.count("error: unknown flag") == lines


def test_a_bad_flag_under_torchrun_prints_one_error():
    r = run_torchrun("02_transformer_mt", "--no_such_flag=1", nproc=2, timeout=120)
    assert r.returncode != 0 and r.output.count("error: unknown flag --no_such_flag=1") == 1, r.output


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_gpu_is_refused_before_any_work(script, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error(capsys, script, ["--preset", "tiny", "--device=cuda", f"--out_dir={tmp_path / 'o'}"], 1,
                     "--device cuda")
    assert "cpu" in line  # it names what the machine has
    assert not (tmp_path / "o").exists(), "work started before the device was checked"


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unwritable_out_dir_is_refused_before_any_work(script, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out_dir in (blocker, blocker / "sub"):
        one_error(capsys, script, ["--preset", "tiny", f"--out_dir={out_dir}"], 1, f"--out_dir {out_dir}")
    assert blocker.read_text() == "not a folder"


def test_download_checks_what_arrived(tmp_path, http_server):
    """The plumbing is the same in every script, so one script's download() stands for all."""
    mod = load_script(SCRIPTS[0])
    served = tmp_path / "served"
    served.mkdir()
    (served / "portal.gz").write_text("<!DOCTYPE html><html><body>Please log in</body></html>")
    (served / "notgzip.gz").write_bytes(b"PK\x03\x04 a zip, not a gzip")
    (served / "ok.gz").write_bytes(b"\x1f\x8b rest of a gzip stream")
    url = http_server(served)
    dest = tmp_path / "data"
    for name, magic, needle in (("portal.gz", None, "it is an HTML page"),  # no magic known: still no HTML
                                ("portal.gz", b"\x1f\x8b", "does not start with"),
                                ("notgzip.gz", b"\x1f\x8b", "does not start with")):
        with pytest.raises(mod.UserError, match=rf"(?s){url}/{name} did not send.*{needle}.*by hand"):
            mod.download(f"{url}/{name}", str(dest / name), magic=magic)
        assert not (dest / name).exists() and not (dest / f"{name}.part").exists()
    assert mod.download(f"{url}/ok.gz", str(dest / "ok.gz"), magic=b"\x1f\x8b") == str(dest / "ok.gz")
    assert (dest / "ok.gz").read_bytes() == (served / "ok.gz").read_bytes()
    with pytest.raises(mod.UserError, match=r"could not download .*404"):
        mod.download(f"{url}/missing.txt", str(dest / "missing.txt"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_load_checkpoint_refuses_what_it_should(script, tmp_path):
    import torch
    mod = load_script(script)
    cfg = mod.parse_args(["--preset", "tiny"])
    model, opt = torch.nn.Linear(2, 2), None
    good, other = str(tmp_path / "good.pt"), str(tmp_path / "other.pt")
    mod.save_checkpoint(good, model, opt, cfg, 3, 1.5, stage="alpha")
    ckpt = mod.load_checkpoint(good, cfg, stage="alpha")
    assert ckpt["script"] == mod.SCRIPT_NAME and ckpt["step"] == 3 and ckpt["stage"] == "alpha"
    with pytest.raises(mod.UserError, match="not a .* beta checkpoint"):
        mod.load_checkpoint(good, cfg, stage="beta")
    torch.save({**ckpt, "script": "99_other"}, other)
    with pytest.raises(mod.UserError, match=r"is not a .*checkpoint \(it is: 99_other"):
        mod.load_checkpoint(other, cfg)
    if mod.MODEL_KEYS:
        key = mod.MODEL_KEYS[0]
        torch.save({**ckpt, "config": {**ckpt["config"], key: "something else"}}, other)
        with pytest.raises(mod.UserError, match=f"another model config: {key}="):
            mod.load_checkpoint(other, cfg)
    with open(good, "rb") as f:
        data = f.read()
    with open(other, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated
    with pytest.raises(mod.UserError, match="not a checkpoint this script can read"):
        mod.load_checkpoint(other, cfg)
    with pytest.raises(mod.UserError, match="no checkpoint at"):
        mod.load_checkpoint(str(tmp_path / "absent.pt"), cfg)
    mod.save_checkpoint(other, None, None, cfg, 0, 0.0, stage="data", pairs=torch.arange(3))  # no model
    saved = mod.load_checkpoint(other, cfg, stage="data")
    assert saved["model"] is None and saved["optimizer"] is None and saved["pairs"].tolist() == [0, 1, 2]
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("script", SCRIPTS)
def test_load_checkpoint_runs_no_code_from_a_pickle(script, tmp_path, monkeypatch):
    import pickle
    mod = load_script(script)
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"model": _Exploit()}, f, protocol=2)
    with pytest.raises(mod.UserError, match="not a checkpoint this script can read"):
        mod.load_checkpoint("evil.pt", None)
    assert not (tmp_path / "pwned").exists()


# --- The milestone section copies on its own (issue #15). tests/milestones/milestone_0N.py builds and
# runs each script's main classes from the namespace that the section alone defines.
@pytest.mark.parametrize("script", SCRIPTS)
def test_milestone_section_runs_on_its_own(script):
    import importlib.util
    path = ROOT / "tests" / "milestones" / f"milestone_{script[:2]}.py"
    spec = importlib.util.spec_from_file_location(f"milestone_check_{script[:2]}", path)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    ns = milestone_namespace(script)
    assert not {"Config", "UserError", "parse_args", "train", "main"} & set(ns), \
        f"{script}'s milestone section defines names of other sections"
    checks.check(ns)
