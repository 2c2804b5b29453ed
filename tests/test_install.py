"""Installing vlp: ranges in setup.cfg, the lock in constraints.txt, scripts/setup.sh, the `vlp` command
with its environment report, and vlp.compat's feature checks."""
from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from tests.conftest import repo_root
from vlp import cli, compat, env
from vlp.config import ConfigError

ROOT = repo_root()


def run_python(args, env_extra=None, **kw):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ, timeout=300, **kw)


# ---- setup.cfg and constraints.txt --------------------------------------------------------------------------


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def requirements(cfg, section, key) -> list[Requirement]:
    return [Requirement(line) for line in cfg[section][key].strip().splitlines() if line.strip()]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt line is not an exact pin: {line!r}"
            pins[canon(name)] = version
    return pins


def canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def all_requirements():
    cfg = setup_cfg()
    reqs = requirements(cfg, "options", "install_requires")
    for extra in cfg["options.extras_require"]:
        reqs += requirements(cfg, "options.extras_require", extra)
    return reqs


def test_setup_cfg_states_ranges_not_pins():
    reqs = all_requirements()
    assert {"torch", "torchvision", "open-clip-torch", "accelerate"} <= {canon(r.name) for r in reqs}
    pinned = [str(r) for r in reqs if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins belong in constraints.txt, not setup.cfg: {pinned}"
    # The GPU node of issue 17 (torch 2.11, torchvision 0.26, accelerate 1.15, transformers 5.17,
    # sentencepiece 0.2.2) and a cluster's torch 2.13 + torchvision 0.28 must satisfy the ranges.
    site = {"torch": ["2.11.0", "2.13.0"], "torchvision": ["0.26.0", "0.28.0"], "accelerate": ["1.15.0"],
            "transformers": ["5.17.0"], "sentencepiece": ["0.2.2"]}
    for r in reqs:
        for version in site.get(canon(r.name), []):
            assert r.specifier.contains(version), f"{r} excludes {r.name} {version}"


def test_constraints_lock_every_requirement_inside_its_range():
    pins = lock()
    assert "vlp" not in pins
    assert not any(line.startswith("-e") for line in (ROOT / "constraints.txt").read_text().splitlines())
    for r in all_requirements():
        name = canon(r.name)
        assert name in pins, f"{r.name} is not locked in constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} is outside {r}"


def test_pytest_settings_live_outside_the_environment_key():
    assert "tool:pytest" not in setup_cfg()
    assert "not slow" in (ROOT / "pytest.ini").read_text()


# ---- scripts/setup.sh, run against a stand-in python3 --------------------------------------------------------

FAKE_PYTHON3 = r"""#!/usr/bin/env bash
# Stands in for python3: `-m venv DIR` makes DIR/bin/python, which only logs its arguments (the shared
# environment); a clone's own `.venv` is made by the real interpreter (it holds no packages: cheap).
case "$1" in
  --version) echo "Python 3.11.7" ;;
  -m) [ "$2" = venv ] || exit 3
      dir="${@: -1}"
      if [ "${dir##*/}" = .venv ]; then exec "$REAL_PYTHON" -m venv --without-pip "$dir"; fi
      sleep "${FAKE_VENV_SECONDS:-0}"
      mkdir -p "$dir/bin" "$dir/lib/python3.11/site-packages"
      printf '#!/usr/bin/env bash\necho "$0 $*" >> "%s"\n' "$FAKE_LOG" > "$dir/bin/python"
      chmod +x "$dir/bin/python" ;;
  *) exit 3 ;;
esac
"""


def _sandbox_clone(repo: Path) -> Path:
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.cfg", "pyproject.toml", "constraints.txt", "scripts/setup.sh"):
        (repo / name).write_bytes((ROOT / name).read_bytes())
    return repo


@pytest.fixture()
def setup_sandbox(tmp_path):
    repo = _sandbox_clone(tmp_path / "clone")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").write_text(FAKE_PYTHON3)
    (shims / "python3").chmod(0o755)
    log = tmp_path / "pip.log"
    environ = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "FAKE_LOG": str(log),
               "VLP_ENV_ROOT": str(tmp_path / "envs"), "REAL_PYTHON": sys.executable}

    def run_setup(clone: Path = repo, **extra):
        subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env={**environ, **extra}, check=True,
                       capture_output=True)
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines, clone / ".venv", (clone / ".venv" / "shared").resolve()

    return repo, run_setup


def test_setup_sh_installs_through_the_lock_and_keys_the_venv_on_it(setup_sandbox):
    repo, run_setup = setup_sandbox
    calls, _, venv = run_setup()
    installs = [c for c in calls if " -m pip install " in c]
    assert installs and all("-c constraints.txt" in c for c in installs), calls
    assert any('-e .[dev,remote,hf,ray]' in c for c in installs), calls
    assert (venv / ".complete").exists()
    # Reused: only the editable link is refreshed, nothing is resolved again.
    calls, _, again = run_setup()
    assert again == venv and len(calls) == 1 and "--no-deps" in calls[0], calls
    # A range edited in setup.cfg alone installs nothing new; a changed lock is a new environment.
    (repo / "setup.cfg").write_text((repo / "setup.cfg").read_text().replace("torch>=", "torch>=0.1,>="))
    calls, _, same = run_setup()
    assert same == venv and len(calls) == 1 and "--no-deps" in calls[0], calls
    with open(repo / "constraints.txt", "a") as fh:
        fh.write("# changed\n")
    calls, _, changed = run_setup()
    assert changed != venv and any("-c constraints.txt" in c for c in calls), calls


def test_two_setups_started_together_build_the_environment_once(setup_sandbox, tmp_path):
    """Without the lock the second set-up saw no finished environment, removed the one being built and built
    its own (`OSError ... libtriton.so` in the first); with it the second waits and reuses the first's."""
    import concurrent.futures

    repo, run_setup = setup_sandbox
    other = _sandbox_clone(tmp_path / "other")
    calls = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for job in [pool.submit(run_setup, clone, FAKE_VENV_SECONDS="1") for clone in (repo, other)]:
            calls += job.result()[0]
    (env,) = (tmp_path / "envs").glob("venv-*")
    assert (env / ".complete").exists() and (repo / ".venv" / "shared").resolve() == env
    assert sum(".[dev,remote,hf,ray]" in c for c in calls) == 1, calls   # built once; the other run reused it


def test_each_clone_runs_its_own_code_from_the_shared_environment(setup_sandbox, tmp_path):
    """Two clones set up one after the other share one environment, whose editable install then points at the
    second: `.venv/bin/python` and `.venv/bin/vlp` of the first still import the first clone's vlp."""
    repo, run_setup = setup_sandbox
    other = _sandbox_clone(tmp_path / "other")
    for clone in (repo, other):
        (clone / "vlp").mkdir()
        (clone / "vlp" / "__init__.py").write_text(f"WHO = {clone.name!r}\n")
    *_, env = run_setup(repo)
    site = next(env.glob("lib/python3*/site-packages"))
    (env / "bin" / "vlp").write_text(f"#!{env}/bin/python\nimport vlp\nprint('vlp', vlp.WHO)\n")
    (env / "bin" / "vlp").chmod(0o755)
    for clone in (repo, other):
        run_setup(clone)
    (site / "__editable__.vlp-0.1.0.pth").write_text(f"{other}\n")   # what `pip install -e .` in `other` leaves
    for clone in (repo, other):
        py = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", "import vlp; print(vlp.WHO)"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
        assert py.stdout.strip() == clone.name, py.stderr
        cmd = subprocess.run([str(clone / ".venv" / "bin" / "vlp")], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": ""})
        assert cmd.stdout.strip() == f"vlp {clone.name}", cmd.stderr


# ---- vlp.compat ----------------------------------------------------------------------------------------------


def test_feature_checks_find_what_the_supported_torch_has():
    # torch >= 2.4 (setup.cfg's floor) has all four.
    assert compat.has_fsdp2() and compat.has_flop_counter()
    assert compat.has_torch_amp() and compat.has_load_weights_only()
    assert compat.require_fsdp2() is compat.fully_shard()
    assert compat.require_flop_counter().__name__ == "FlopCounterMode"


def one_line_naming(e: pytest.ExceptionInfo, *words) -> None:
    msg = str(e.value)
    assert "\n" not in msg and torch.__version__ in msg
    for w in words:
        assert w in msg, msg


def test_missing_features_fail_with_one_line_naming_the_torch_release(monkeypatch):
    monkeypatch.setattr(compat, "FSDP2_MODULES", ("vlp_no_such_module", "torch.nn"))
    assert not compat.has_fsdp2()
    with pytest.raises(ConfigError) as e:
        compat.require_fsdp2()
    one_line_naming(e, "--fsdp", "FSDP2", "torch >= 2.4")

    monkeypatch.setitem(sys.modules, "torch.utils.flop_counter", None)  # import now raises ImportError
    assert not compat.has_flop_counter()
    with pytest.raises(ConfigError) as e:
        compat.require_flop_counter("MFU")
    one_line_naming(e, "MFU", "FlopCounterMode", "torch >= 2.1")

    monkeypatch.delattr(torch.amp, "GradScaler")
    assert not compat.has_torch_amp()
    with pytest.raises(ConfigError) as e:
        compat.require_torch_amp()
    one_line_naming(e, "torch >= 2.3")

    monkeypatch.setattr(torch, "load", lambda f, map_location=None: None)
    assert not compat.has_load_weights_only()
    with pytest.raises(ConfigError) as e:
        compat.require_load_weights_only()
    one_line_naming(e, "weights_only", "torch >= 1.13")


def test_total_norm_without_get_total_norm_gives_the_same_figure(monkeypatch):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(37, 5, generator=g), torch.randn(11, generator=g) * 100, torch.zeros(3)]
    fused = compat.total_norm(grads)
    assert torch.allclose(fused, torch.cat([t.flatten() for t in grads]).norm(), rtol=1e-6)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # torch < 2.6
    for p in (2.0, 1.0, float("inf")):
        ref = torch.cat([t.flatten() for t in grads]).norm(p)
        assert torch.allclose(compat.total_norm(grads, p), ref, rtol=1e-6), p


def test_optional_package_missing_names_its_extra():
    assert compat.has_module("yaml") and not compat.has_module("vlp_no_such_package")
    with pytest.raises(ConfigError, match=r"--tokenizer hf:DIR needs the vlp_no_such_package package: "
                                          r"pip install 'vlp\[hf\]'"):
        compat.require_module("vlp_no_such_package", "hf", "--tokenizer hf:DIR")


# ---- the environment report and the `vlp` command -----------------------------------------------------------


def test_env_report_without_cuda_matches_this_environment():
    p = run_python(["-m", "vlp", "env", "--json"], {"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    import vlp

    assert r["vlp"]["version"] == vlp.__version__
    assert r["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    t = r["torch"]
    assert t["version"] == torch.__version__ and t["cuda"] == torch.version.cuda
    assert t["cuda_available"] is False and t["device_count"] == 0 and t["devices"] == []
    assert isinstance(t["threads"], int) and t["threads"] >= 1
    assert set(t["features"]) == {"fsdp2", "flop_counter", "torch_amp", "load_weights_only"}
    for name in ("open_clip_torch", "webdataset", "accelerate", "transformers", "sentencepiece", "fsspec"):
        assert name in r["packages"]
    assert r["packages"]["open_clip_torch"] == metadata.version("open_clip_torch")
    assert r["packages"]["accelerate"] == metadata.version("accelerate")
    assert r["cpu"]["count"] == os.cpu_count()
    assert r["env"]["CUDA_VISIBLE_DEVICES"] == ""
    text = env.format_report(r)
    for label in ("vlp", "python", "torch", "CUDA devices", "torch threads", "CPUs", "open_clip_torch",
                  "webdataset", "accelerate", "transformers", "sentencepiece", "fsspec"):
        assert any(line.startswith(label + " ") for line in text.splitlines()), label
    assert f"torch            {torch.__version__}" in text or torch.__version__ in text
    assert "CUDA devices" in text and "0 (" in text


def test_env_report_describes_a_broken_torch_instead_of_crashing(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise OSError("libcudart.so.13: cannot open shared object file")\n')
    environ = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    p = run_python(["-m", "vlp", "env"], environ)
    assert p.returncode == 0, p.stderr
    assert "import failed: OSError: libcudart.so.13" in p.stdout
    assert "torchvision" in p.stdout and "import fails" in p.stdout  # its import needs torch too


def test_env_report_lists_each_device(monkeypatch):
    class Props:
        name, total_memory, major, minor = "NVIDIA H200", 150_000_000_000, 9, 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    r = env.torch_report()
    assert r["device_count"] == 2 and r["devices"][1] == {"index": 1, "name": "NVIDIA H200",
                                                          "memory_gib": 139.7, "capability": "9.0"}
    text = env.format_report({**env.collect(), "torch": r})
    assert "cuda:1" in text and "NVIDIA H200, 139.7 GiB, sm 9.0" in text


def test_cudnn_version_integer_decoding():
    assert env.cudnn_string(8907) == "8.9.7" and env.cudnn_string(92400) == "9.24.0"
    assert env.cudnn_string(None) is None


def test_cli_dispatches_by_table_and_refuses_unknown_commands(capsys):
    assert cli.main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vlp"]["version"]
    assert cli.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'nope'" in err and "env" in err
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().err
    # A group is a nested table: `vlp tools env --json`.
    table = {"tools": ({"env": ("vlp.env:main", "report")}, "a group")}
    assert cli.dispatch(table, ["tools", "env", "--json"], "vlp") == 0
    assert json.loads(capsys.readouterr().out)["torch"]["version"] == torch.__version__
    for target, _ in cli.COMMANDS.values():
        if isinstance(target, str):
            assert callable(cli.resolve(target)), target


def test_console_entry_point_is_declared_and_installed():
    scripts = setup_cfg()["options.entry_points"]["console_scripts"]
    entries = dict(line.replace(" ", "").split("=") for line in scripts.strip().splitlines())
    assert cli.resolve(entries["vlp"]) is cli.main
    script = Path(sys.executable).parent / "vlp"
    if not script.exists():
        pytest.skip("the `vlp` script is not installed in this environment (scripts/setup.sh installs it)")
    p = subprocess.run([str(script), "env", "--json"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["torch"]["version"] == torch.__version__


# ---- installing into a user's environment (slow: builds a venv, asks the package index) -----------------------


@pytest.mark.slow
@pytest.mark.network
def test_install_keeps_the_torch_a_user_already_has(tmp_path):
    """pip install -e . into a venv holding torch 2.13.0 + torchvision 0.28.0 replaces neither (pip's report)."""
    venv = tmp_path / "user-env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # --no-deps: only the metadata matters here (this torchvision wheel does not import beside a CPU torch).
    subprocess.run(pip + ["--no-deps", "torch==2.13.0", "torchvision==0.28.0"], check=True, capture_output=True)
    report = tmp_path / "report.json"
    p = subprocess.run(pip + ["--dry-run", "--report", str(report), "-e", f"{ROOT}[hf]"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    planned = {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "torch" not in planned and "torchvision" not in planned, planned
    assert "vlp" in planned and "open-clip-torch" in planned
