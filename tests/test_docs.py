"""docs/configuration.md and sparkops.config.SETTINGS must not drift apart."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sparkops.config import SETTINGS, SETTINGS_BY_KEY, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
SCRIPT = ROOT / "scripts" / "gen_config_docs.py"

ROW = re.compile(r"^\| `(?P<key>[a-z_]+\.[a-z_]+)` \| (?P<kind>\w+) \| `(?P<default>[^`]*)` \| "
                 r"`(?P<env>[A-Z_]+)` \|", re.MULTILINE)


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_page_is_what_the_generator_writes():
    problem = gen.check(DOC)
    assert problem is None, problem


def test_every_setting_is_documented_with_default_and_env_name(doc_text):
    rows = {m["key"]: m for m in ROW.finditer(doc_text)}
    for setting in SETTINGS:
        assert setting.key in rows, f"{setting.key} is not documented in {DOC}"
        row = rows[setting.key]
        assert row["kind"] == setting.kind
        assert row["default"] == gen.toml_value(setting.default), setting.key
        assert row["env"] == setting.env_name, setting.key


def test_no_documented_key_that_is_not_a_setting(doc_text):
    documented = [m["key"] for m in ROW.finditer(doc_text)]
    assert len(documented) == len(set(documented)), "a setting is documented twice"
    assert set(documented) - set(SETTINGS_BY_KEY) == set()


def test_documented_env_names_exist(doc_text):
    env_names = {s.env_name for s in SETTINGS}
    mentioned = set(re.findall(r"`(SPARKOPS_(?:STORAGE|DISPATCH|RECLAIM|RUNNER|UI|WATCHDOG|GPU|DISK|ALERTS)_[A-Z_]+)`",
                               doc_text))
    mentioned -= {"SPARKOPS_UI_PASSWORD", "SPARKOPS_STORAGE_", "SPARKOPS_UI_"}
    assert mentioned - env_names == set()


def test_example_toml_is_valid_and_holds_the_defaults(doc_text, tmp_path):
    example = re.search(r"## Example `sparkops.toml`\n\n```toml\n(.*?)```", doc_text, re.DOTALL).group(1)
    data = tomllib.loads(example)
    flat = {f"{section}.{name}": value for section, table in data.items()
            for name, value in table.items()}
    assert flat == {s.key: s.default for s in SETTINGS}
    defaults = load_settings(env={}, cwd=tmp_path)
    (tmp_path / "sparkops.toml").write_text(example)
    from_file = load_settings(env={}, cwd=tmp_path)
    assert from_file.source == tmp_path / "sparkops.toml"
    assert from_file.values == defaults.values


def test_check_reports_a_stale_page(tmp_path):
    port = SETTINGS_BY_KEY["ui.port"]
    current = gen.setting_row(port)
    old = current.replace(f"`{gen.toml_value(port.default)}`", f"`{port.default + 1}`")
    assert old != current
    stale = tmp_path / "configuration.md"
    stale.write_text(gen.render().replace(current, old))
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", "--path", str(stale)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "out of date" in result.stderr
    assert "-" + old in result.stderr
    assert "+" + current in result.stderr


def test_check_reports_a_missing_page(tmp_path):
    assert gen.main(["--check", "--path", str(tmp_path / "nope.md")]) == 1


def test_generator_writes_the_page(tmp_path):
    out = tmp_path / "docs" / "configuration.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--path", str(out)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == gen.render()
    assert gen.main(["--check", "--path", str(out)]) == 0
