"""Tests for the deployment files: systemd/regdisc.service and conf/regdisc.env.example."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections import Counter
from pathlib import Path


from regdisc.config import SETTINGS, load_config

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / "conf" / "regdisc.env.example"
UNIT = ROOT / "systemd" / "regdisc.service"

SETTING_NAMES = {s.variable for s in SETTINGS}
# An assignment in the env example, active or commented out.
ASSIGNMENT = re.compile(r"^(?P<comment>#?)(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")
UNIT_KEY = re.compile(r"^(?P<key>[A-Z][A-Za-z0-9]*)\s*=\s*(?P<value>.*)$")


def env_blocks(text: str) -> list[list[str]]:
    """The example's paragraphs, as lists of lines."""
    return [block.splitlines() for block in re.split(r"\n\s*\n", text) if block.strip()]


def active_assignments(text: str) -> dict[str, str]:
    """VAR=value lines that are not comments, as systemd would read them.

    Values are taken verbatim, so the example must not rely on systemd's
    quoting or backslash rules, which this does not apply.
    """
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = ASSIGNMENT.match(stripped)
        assert match, f"line {number} is neither a comment nor VAR=value: {line!r}"
        name, value = match["name"], match["value"]
        assert not set(value) & set("\"'\\$"), f"line {number} needs systemd quoting: {line!r}"
        assert name not in found, f"line {number} repeats {name}"
        found[name] = value
    return found


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) pairs in order; repeated keys are kept.

    Raises ValueError on a line that is neither a section, a comment nor Key=value.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        match = UNIT_KEY.match(line)
        if match is None or current is None:
            raise ValueError(f"line {number}: not a section or Key=value: {raw!r}")
        current.append((match["key"], match["value"].strip()))
    if pending:
        raise ValueError("the last line ends with a continuation backslash")
    return sections


def assigns(block: list[str], name: str) -> bool:
    """Whether ``block`` assigns ``name``, actively or commented out."""
    return any((m := ASSIGNMENT.match(line)) and m["name"] == name for line in block)


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in section if k == key]


def test_env_example_documents_every_setting_once_with_its_default() -> None:
    """The env example has one block per setting, with its option, default and assignment."""
    text = ENV_EXAMPLE.read_text()
    assigned = Counter(
        m["name"] for line in text.splitlines() if (m := ASSIGNMENT.match(line.strip()))
    )
    assert {name: assigned[name] for name in SETTING_NAMES} == {name: 1 for name in SETTING_NAMES}
    assert set(re.findall(r"\bREGDISC_[A-Z0-9_]+", text)) <= SETTING_NAMES
    assert set(assigned) <= SETTING_NAMES

    blocks = env_blocks(text)
    for setting in SETTINGS:
        [block] = [b for b in blocks if assigns(b, setting.variable)]
        assert all(line.startswith("#") for line in block[:-1]), block
        assert f"--{setting.option}" in "\n".join(block), block
        [default] = [line for line in block if line.startswith("# default: ")]
        assignment = ASSIGNMENT.match(block[-1])
        assert assignment and assignment["name"] == setting.variable, block
        if setting.default is None:
            assert re.fullmatch(r"# default: none\b.*", default), block
            assert block[-1] == f"#{setting.variable}=", block
        else:
            assert default == f"# default: {setting.default}", block
            if assignment["comment"]:
                assert assignment["value"] == setting.default, block


def test_env_example_active_assignments_load() -> None:
    """The env example's only active line, REGDISC_LOG_FORMAT=json, loads with load_config."""
    environ = active_assignments(ENV_EXAMPLE.read_text())
    assert environ == {"REGDISC_LOG_FORMAT": "json"}
    config = load_config(environ)
    assert config.log_format == "json"


def test_env_example_commented_defaults_load_as_defaults() -> None:
    """Uncommenting every example line that has a value gives the same config as no variables."""
    environ = {
        m["name"]: m["value"]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if (m := ASSIGNMENT.match(line.strip())) and m["value"]
    }
    environ.pop("REGDISC_LOG_FORMAT")
    assert load_config(environ) == load_config({})


def test_unit_runs_twistd_as_regdisc_with_env_file() -> None:
    """The unit runs `twistd -n --pidfile= regdisc` as a user, with the env file and NoNewPrivileges."""
    sections = parse_unit(UNIT.read_text())
    service = sections["Service"]
    [exec_start] = values(service, "ExecStart")
    argv = shlex.split(exec_start)
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "twistd"
    assert argv[1:] == ["-n", "--pidfile=", "regdisc"]
    [user] = values(service, "User")
    assert user and user != "root"
    [env_file] = values(service, "EnvironmentFile")
    assert env_file.removeprefix("-") == "/etc/regdisc/regdisc.env"
    assert values(service, "NoNewPrivileges") == ["yes"]
    assert values(sections["Install"], "WantedBy") == ["multi-user.target"]


def runnable_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit in tmp_path, its ExecStart binary swapped for one that exists here."""
    binary = os.path.abspath(shutil.which("twistd") or "/bin/true")
    text = re.sub(
        r"^ExecStart=\S+", lambda _: f"ExecStart={binary}", UNIT.read_text(), flags=re.M
    )
    text = text.replace("[Install]", extra + "[Install]")
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def verify(analyze: str, unit: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit code and its output lines about ``unit``."""
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_LOG_COLOR": "0"},
        cwd=unit.parent,
    )
    # In a container, verify may warn about other units; keep only ours.
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if unit.name in line]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds no fault in the unit; without systemd-analyze, the line parser accepts it."""
    sections = parse_unit(UNIT.read_text())
    assert set(sections) == {"Unit", "Service", "Install"}
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # No systemd here (e.g. CI): the strict line parse above is the check.
        return
    returncode, ours = verify(analyze, runnable_copy(tmp_path))
    assert returncode == 0 and ours == [], ours

    # verify exits 0 even for unknown keys and bad values, so make sure such a
    # fault does show up in the lines the check above looks at.
    broken = tmp_path / "broken"
    broken.mkdir()
    _, ours = verify(analyze, runnable_copy(broken, "NoSuchSetting=1\nRestart=sometimes\n"))
    assert any("NoSuchSetting" in line for line in ours), ours
    assert any("sometimes" in line for line in ours), ours
