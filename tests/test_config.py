"""Settings: defaults, sparkops.toml, SPARKOPS_* overrides, paths, URLs and secrets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

from sparkops.config import (
    RESERVED_ENV,
    SETTINGS,
    SETTINGS_BY_KEY,
    Secrets,
    load_secrets,
    load_settings,
    mask_url,
)
from sparkops.core.errors import EXIT_USAGE, ConfigError


def config_error(*args, **kwargs) -> str:
    """The message of the ConfigError that ``load_settings(*args, **kwargs)`` raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    return str(info.value)


# -- where values come from ------------------------------------------------------------


def test_missing_default_file_means_all_defaults(tmp_path):
    settings = load_settings(env={}, cwd=tmp_path)
    assert settings.source is None
    assert "defaults" in settings.describe_source()
    assert settings["storage.board_url"] == f"sqlite:///{tmp_path}/data/kanban.db"
    assert settings["storage.ops_url"] == f"sqlite:///{tmp_path}/data/sparkops.db"
    assert settings["runner.log_file"] == tmp_path / "data" / "logs" / "jobs_runner.log"
    for setting in SETTINGS:
        if setting.kind not in ("url", "path", "paths"):
            assert settings[setting.key] == setting.default, setting.key
    assert settings["disk.paths"] == [tmp_path / "data"]  # relative paths resolve too
    assert not (tmp_path / "data").exists()


def test_explicit_config_path_that_is_missing_is_an_error(tmp_path):
    message = config_error(tmp_path / "nope.toml", env={}, cwd=tmp_path)
    assert str(tmp_path / "nope.toml") in message
    assert "--config" in message


def test_sparkops_config_path_that_is_missing_is_an_error(tmp_path):
    message = config_error(env={"SPARKOPS_CONFIG": "conf/nope.toml"}, cwd=tmp_path)
    assert str(tmp_path / "conf" / "nope.toml") in message
    assert "SPARKOPS_CONFIG" in message


def test_sparkops_config_names_the_file(tmp_path, write_config):
    path = write_config({"ui": {"port": 9001}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = load_settings(env={"SPARKOPS_CONFIG": str(path)}, cwd=elsewhere)
    assert settings.source == path
    assert settings["ui.port"] == 9001


def test_config_option_wins_over_sparkops_config(tmp_path, write_config):
    path = write_config({"ui": {"port": 9001}})
    settings = load_settings(path, env={"SPARKOPS_CONFIG": str(tmp_path / "nope.toml")},
                             cwd=tmp_path)
    assert settings["ui.port"] == 9001


def test_default_file_is_read_from_the_current_directory(tmp_path, write_config):
    write_config({"dispatch": {"failure_limit": 3}})
    settings = load_settings(env={}, cwd=tmp_path)
    assert settings.source == tmp_path / "sparkops.toml"
    assert settings["dispatch.failure_limit"] == 3


def test_file_values_override_defaults(tmp_path, write_config):
    path = write_config({
        "storage": {"busy_timeout_ms": 0},
        "dispatch": {"failure_limit": 5},
        "runner": {"promote_interval_seconds": 2, "log_backups": 0},
        "ui": {"address": "0.0.0.0", "port": 9000, "allow_unauthenticated_remote": True},
    })
    settings = load_settings(path, env={}, cwd=tmp_path)
    assert settings["storage.busy_timeout_ms"] == 0
    assert settings["dispatch.failure_limit"] == 5
    assert settings["runner.promote_interval_seconds"] == 2.0
    assert isinstance(settings["runner.promote_interval_seconds"], float)
    assert settings["runner.log_backups"] == 0
    assert settings.ui.address == "0.0.0.0"
    assert settings.ui.port == 9000
    assert settings.ui.allow_unauthenticated_remote is True
    assert settings["runner.log_max_bytes"] == SETTINGS_BY_KEY["runner.log_max_bytes"].default


def test_environment_overrides_the_file(tmp_path, write_config):
    path = write_config({"ui": {"port": 9000, "allow_unauthenticated_remote": True},
                         "runner": {"promote_interval_seconds": 2.0}})
    env = {"SPARKOPS_UI_PORT": "9100", "SPARKOPS_UI_ALLOW_UNAUTHENTICATED_REMOTE": "no",
           "SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS": "0.5"}
    settings = load_settings(path, env=env, cwd=tmp_path)
    assert settings["ui.port"] == 9100
    assert settings["ui.allow_unauthenticated_remote"] is False
    assert settings["runner.promote_interval_seconds"] == 0.5


def test_unknown_section_attribute_is_an_attribute_error(tmp_path):
    settings = load_settings(env={}, cwd=tmp_path)
    with pytest.raises(AttributeError):
        settings.storag  # noqa: B018


# -- mistakes in the file ------------------------------------------------------------


def test_unknown_section_names_it_the_file_and_the_known_sections(write_config, tmp_path):
    path = write_config({"storge": {"board_url": "sqlite:///x.db"}})
    message = config_error(path, env={}, cwd=tmp_path)
    assert "[storge]" in message
    assert str(path) in message
    for section in ("storage", "dispatch", "runner", "ui"):
        assert section in message


def test_unknown_key_names_it_the_file_and_the_known_keys(write_config, tmp_path):
    path = write_config({"storage": {"board_ulr": "sqlite:///x.db"}})
    message = config_error(path, env={}, cwd=tmp_path)
    assert "storage.board_ulr" in message
    assert str(path) in message
    assert "board_url" in message and "ops_url" in message and "busy_timeout_ms" in message


def test_a_section_that_is_not_a_table_is_refused(write_config, tmp_path):
    path = write_config(text_='ui = 8501\n')
    message = config_error(path, env={}, cwd=tmp_path)
    assert "ui" in message and str(path) in message and "table" in message


@pytest.mark.parametrize("key, value", [
    ("dispatch.failure_limit", "2"),         # string for int
    ("dispatch.failure_limit", 2.0),         # float for int
    ("dispatch.failure_limit", True),        # bool for int
    ("dispatch.failure_limit", 0),           # below minimum
    ("ui.port", 0),                          # below minimum
    ("ui.port", 65536),                      # above maximum
    ("runner.log_max_bytes", 9_999),         # below minimum
    ("runner.promote_interval_seconds", 0.05),
    ("runner.promote_interval_seconds", "5"),
    ("runner.promote_interval_seconds", True),
    ("runner.promote_interval_seconds", math.nan),
    ("runner.promote_interval_seconds", math.inf),
    ("ui.allow_unauthenticated_remote", "yes"),
    ("ui.allow_unauthenticated_remote", 1),
    ("ui.address", 127),
    ("ui.address", ""),
    ("runner.log_file", 3),
    ("storage.board_url", 5),
])
def test_wrong_value_in_file_names_key_file_and_what_is_allowed(write_config, tmp_path, key, value):
    section, name = key.split(".")
    path = write_config({section: {name: value}})
    message = config_error(path, env={}, cwd=tmp_path)
    assert key in message
    assert str(path) in message
    assert SETTINGS_BY_KEY[key].allowed() in message


def test_allowed_describes_range():
    assert SETTINGS_BY_KEY["ui.port"].allowed() == "an integer from 1 to 65535"
    assert SETTINGS_BY_KEY["dispatch.failure_limit"].allowed() == "an integer >= 1"
    assert SETTINGS_BY_KEY["runner.promote_interval_seconds"].allowed() == "a number >= 0.1"


def test_invalid_toml_names_the_file(write_config, tmp_path):
    path = write_config(text_="[ui\nport = 8501\n")
    message = config_error(path, env={}, cwd=tmp_path)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "line 1" in message


def test_unreadable_config_file_names_it(tmp_path):
    folder = tmp_path / "sparkops.toml"
    folder.mkdir()
    message = config_error(env={}, cwd=tmp_path)
    assert str(folder) in message and "cannot read" in message


@pytest.mark.parametrize("text, key", [
    ('[ui]\npassword = "hunter2"\n', "ui.password"),
    ('[ui]\nui_password = "hunter2"\n', "ui.ui_password"),
    ('[ui]\nTelegram_Token = "hunter2"\n', "ui.Telegram_Token"),
    ('[storage]\napi_key = "hunter2"\n', "storage.api_key"),
    ('[dispatch]\ntoken = "hunter2"\n', "dispatch.token"),
    ('telegram_token = "hunter2"\n', "telegram_token"),
    ('[password]\nvalue = "hunter2"\n', "password"),
])
def test_secrets_in_the_file_are_refused_without_echoing_them(write_config, tmp_path, text, key):
    path = write_config(text_=text)
    message = config_error(path, env={}, cwd=tmp_path)
    assert key in message
    assert str(path) in message
    assert "secret" in message and "SPARKOPS_UI_PASSWORD" in message
    assert "hunter2" not in message


# -- environment variables -----------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("SPARKOPS_UI_PORT", "80a"),
    ("SPARKOPS_UI_PORT", "8501.0"),
    ("SPARKOPS_UI_PORT", ""),
    ("SPARKOPS_UI_PORT", "70000"),
    ("SPARKOPS_DISPATCH_FAILURE_LIMIT", "0"),
    ("SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS", "fast"),
    ("SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS", "nan"),
    ("SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS", "inf"),
    ("SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS", "0"),
    ("SPARKOPS_UI_ALLOW_UNAUTHENTICATED_REMOTE", "maybe"),
    ("SPARKOPS_UI_ALLOW_UNAUTHENTICATED_REMOTE", "2"),
    ("SPARKOPS_STORAGE_BOARD_URL", "kanban.db"),
    ("SPARKOPS_STORAGE_BOARD_URL", ""),
])
def test_bad_environment_value_names_the_variable(tmp_path, name, value):
    setting = next(s for s in SETTINGS if s.env_name == name)
    message = config_error(env={name: value}, cwd=tmp_path)
    assert setting.key in message
    assert f"environment variable {name}" in message


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_environment_booleans(tmp_path, text, expected):
    settings = load_settings(env={"SPARKOPS_UI_ALLOW_UNAUTHENTICATED_REMOTE": text}, cwd=tmp_path)
    assert settings["ui.allow_unauthenticated_remote"] is expected


def test_environment_numbers(tmp_path):
    settings = load_settings(env={"SPARKOPS_UI_PORT": " 9000 ",
                                  "SPARKOPS_STORAGE_BUSY_TIMEOUT_MS": "0",
                                  "SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS": "1"}, cwd=tmp_path)
    assert settings["ui.port"] == 9000
    assert settings["storage.busy_timeout_ms"] == 0
    assert settings["runner.promote_interval_seconds"] == 1.0


@pytest.mark.parametrize("name", ["SPARKOPS_STORAGE_FOO", "SPARKOPS_UI_PORTT",
                                  "SPARKOPS_RUNNER_LOGFILE", "SPARKOPS_DISPATCH_"])
def test_unknown_variable_of_a_section_is_refused(tmp_path, name):
    message = config_error(env={name: "1"}, cwd=tmp_path)
    assert name in message
    section = name.split("_")[1].lower()
    for setting in SETTINGS:
        if setting.section == section:
            assert setting.env_name in message


def test_reserved_and_unrelated_variables_are_ignored(tmp_path):
    tables = ("SPARKOPS_CONFIG", "SPARKOPS_SERVICES", "SPARKOPS_REMOTES")
    env = {name: "garbage" for name in RESERVED_ENV if name not in tables}
    env.update({"SPARKOPS_CONFIG": "", "SPARKOPS_WHATEVER": "x", "SPARKOPS_LOG_LEVEL": "DEBUG",
                "SPARKOPS_TEST_PG": "postgresql://x", "sparkops_storage_foo": "1",
                "OTHER_STORAGE_FOO": "1"})
    assert {"SPARKOPS_TASK_ID", "SPARKOPS_RUN_ID", "SPARKOPS_UI_PASSWORD",
            "SPARKOPS_TELEGRAM_TOKEN", "SPARKOPS_WORKSPACE"} <= set(env)
    settings = load_settings(env=env, cwd=tmp_path)
    assert settings.values == load_settings(env={}, cwd=tmp_path).values


def test_no_setting_hides_behind_a_reserved_name():
    assert {s.env_name for s in SETTINGS} & RESERVED_ENV == set()
    assert len({s.env_name for s in SETTINGS}) == len(SETTINGS)


# -- paths and URLs ------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path):
    conf = tmp_path / "conf"
    work = tmp_path / "work"
    conf.mkdir()
    work.mkdir()
    path = conf / "sparkops.toml"
    path.write_text('[storage]\nboard_url = "sqlite:///db/board.db?timeout=5"\n'
                    'ops_url = "sqlite:////srv/ops.db"\n'
                    '[runner]\nlog_file = "logs/runner.log"\n')
    settings = load_settings(path, env={"SPARKOPS_UI_PORT": "9000"}, cwd=work)
    assert settings.base_dir == conf
    assert settings["storage.board_url"] == f"sqlite:///{conf}/db/board.db?timeout=5"
    assert settings["storage.ops_url"] == "sqlite:////srv/ops.db"
    assert settings["runner.log_file"] == conf / "logs" / "runner.log"


def test_relative_environment_urls_also_resolve_against_the_config_file(tmp_path, write_config):
    path = write_config({"ui": {"port": 9000}})
    work = tmp_path / "work"
    work.mkdir()
    settings = load_settings(env={"SPARKOPS_CONFIG": str(path),
                                  "SPARKOPS_STORAGE_OPS_URL": "sqlite:///ops.db",
                                  "SPARKOPS_RUNNER_LOG_FILE": "r.log"}, cwd=work)
    assert settings["storage.ops_url"] == f"sqlite:///{tmp_path}/ops.db"
    assert settings["runner.log_file"] == tmp_path / "r.log"


def test_relative_sparkops_config_resolves_against_the_current_directory(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "s.toml").write_text('[storage]\nboard_url = "sqlite:///b.db"\n')
    settings = load_settings(env={"SPARKOPS_CONFIG": "conf/s.toml"}, cwd=tmp_path)
    assert settings["storage.board_url"] == f"sqlite:///{tmp_path}/conf/b.db"


def test_home_in_path_settings_is_expanded(tmp_path, monkeypatch, write_config):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_config({"runner": {"log_file": "~/sparkops/runner.log"}})
    settings = load_settings(path, env={}, cwd=tmp_path)
    assert settings["runner.log_file"] == tmp_path / "home" / "sparkops" / "runner.log"


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite:///:memory:?cache=shared",
                                 "sqlite:///"])
def test_in_memory_sqlite_is_refused(tmp_path, write_config, url):
    path = write_config({"storage": {"board_url": url}})
    message = config_error(path, env={}, cwd=tmp_path)
    assert "storage.board_url" in message and "in-memory" in message and str(path) in message
    message = config_error(env={"SPARKOPS_STORAGE_OPS_URL": url}, cwd=tmp_path / "x")
    assert "storage.ops_url" in message and "SPARKOPS_STORAGE_OPS_URL" in message


@pytest.mark.parametrize("url", ["sqlite://", "kanban.db", "mysql://u@h/db",
                                 "postgresql+psycopg2://u@h/db", "   "])
def test_unsupported_urls_are_refused(tmp_path, url):
    message = config_error(env={"SPARKOPS_STORAGE_BOARD_URL": url}, cwd=tmp_path)
    assert "storage.board_url" in message
    assert "sqlite:///PATH or postgresql://" in message


def test_refused_url_message_masks_the_password(tmp_path):
    message = config_error(env={"SPARKOPS_STORAGE_BOARD_URL": "mysql://ops:s3cret@db/x"},
                           cwd=tmp_path)
    assert "s3cret" not in message
    assert "mysql://ops:***@db/x" in message


@pytest.mark.parametrize("given, expected", [
    ("postgres://ops:pw@db:5432/board", "postgresql://ops:pw@db:5432/board"),
    ("postgresql://ops@db/board", "postgresql://ops@db/board"),
    ("postgresql+psycopg://ops@db/board", "postgresql+psycopg://ops@db/board"),
    (" postgres://db/board ", "postgresql://db/board"),
])
def test_postgres_urls(tmp_path, given, expected):
    settings = load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": given}, cwd=tmp_path)
    assert settings["storage.board_url"] == expected


@pytest.mark.parametrize("url, masked", [
    ("postgresql://ops:pw@db:5432/board", "postgresql://ops:***@db:5432/board"),
    ("postgresql://ops:p@ss:w0rd@db/board", "postgresql://ops:***@db/board"),
    ("postgresql+psycopg://ops:pw@db/board", "postgresql+psycopg://ops:***@db/board"),
    ("postgresql://ops@db/board", "postgresql://ops@db/board"),
    ("postgresql://db/board", "postgresql://db/board"),
    ("sqlite:////srv/kanban.db", "sqlite:////srv/kanban.db"),
    ("not a url", "not a url"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


# -- secrets -------------------------------------------------------------------------


def test_secrets_from_the_environment(tmp_path):
    secrets = load_secrets(env={"SPARKOPS_UI_PASSWORD": "pw1", "SPARKOPS_TELEGRAM_TOKEN": "tok1"},
                           secrets_file=tmp_path / "missing.toml")
    assert secrets == Secrets(ui_password="pw1", telegram_token="tok1")


def test_no_secrets_anywhere(tmp_path):
    secrets = load_secrets(env={}, secrets_file=tmp_path / "missing.toml")
    assert secrets.ui_password is None and secrets.telegram_token is None
    assert repr(secrets) == ("Secrets(ui_password=unset, telegram_token=unset, "
                             "telegram_chat_id=unset, vllm_api_key=unset)")


def test_secrets_from_top_level_of_streamlit_secrets(tmp_path):
    path = tmp_path / "secrets.toml"
    path.write_text('ui_password = "pw2"\ntelegram_token = "tok2"\n')
    secrets = load_secrets(env={}, secrets_file=path)
    assert (secrets.ui_password, secrets.telegram_token) == ("pw2", "tok2")


def test_secrets_from_a_sparkops_table(tmp_path):
    path = tmp_path / "secrets.toml"
    path.write_text('ui_password = "outer"\n[sparkops]\nui_password = "pw3"\n'
                    'telegram_token = "tok3"\n')
    secrets = load_secrets(env={}, secrets_file=path)
    assert (secrets.ui_password, secrets.telegram_token) == ("pw3", "tok3")


def test_environment_wins_over_secrets_file(tmp_path):
    path = tmp_path / "secrets.toml"
    path.write_text('[sparkops]\nui_password = "from-file"\ntelegram_token = "tok-file"\n')
    secrets = load_secrets(env={"SPARKOPS_UI_PASSWORD": "from-env", "SPARKOPS_TELEGRAM_TOKEN": ""},
                           secrets_file=path)
    assert secrets.ui_password == "from-env"
    assert secrets.telegram_token == "tok-file"  # an empty variable counts as unset


def test_default_secrets_file_is_streamlit_secrets_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text('ui_password = "pw4"\n')
    monkeypatch.chdir(tmp_path)
    assert load_secrets(env={}).ui_password == "pw4"


@pytest.mark.parametrize("text", ['ui_password = 1234\n', '[sparkops]\ntelegram_token = true\n',
                                  'sparkops = "hunter2"\n', 'ui_password = "hunter2\n'])
def test_bad_secrets_file_is_a_config_error_without_the_value(tmp_path, text):
    path = tmp_path / "secrets.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_secrets(env={}, secrets_file=path)
    assert str(path) in str(info.value)
    assert "hunter2" not in str(info.value) and "1234" not in str(info.value)


def test_repr_of_secrets_never_shows_the_values():
    secrets = Secrets(ui_password="hunter2", telegram_token="123:ABC")
    for shown in (repr(secrets), str(secrets), f"{secrets}", repr([secrets])):
        assert "hunter2" not in shown and "123:ABC" not in shown
    assert repr(secrets) == ("Secrets(ui_password=set, telegram_token=set, "
                             "telegram_chat_id=unset, vllm_api_key=unset)")


# -- through the real command line ---------------------------------------------------


def _one_line_error(result) -> str:
    assert result.returncode == EXIT_USAGE, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sparkops: error: ")
    return lines[0]


@pytest.mark.parametrize("sections, key", [
    ({"storage": {"board_ulr": "sqlite:///x.db"}}, "storage.board_ulr"),
    ({"ui": {"port": "8501"}}, "ui.port"),
    ({"dispatch": {"failure_limit": 2.5}}, "dispatch.failure_limit"),
    ({"ui": {"password": "hunter2"}}, "ui.password"),
])
def test_cli_refuses_a_bad_config_file_and_creates_nothing(tmp_path, write_config, sections, key):
    path = write_config(sections)
    line = _one_line_error(run_cli("task", "list", cwd=tmp_path))
    assert key in line and str(path) in line
    assert "hunter2" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparkops.toml"]


def test_cli_refuses_a_missing_config_option(tmp_path):
    line = _one_line_error(run_cli("--config", "nope.toml", "task", "list", cwd=tmp_path))
    assert str(tmp_path / "nope.toml") in line
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_bad_environment_value(tmp_path):
    line = _one_line_error(run_cli("init", cwd=tmp_path, env={"SPARKOPS_UI_PORT": "http"}))
    assert "SPARKOPS_UI_PORT" in line and "ui.port" in line
    assert list(tmp_path.iterdir()) == []


def test_cli_config_json_shows_effective_values_without_passwords(tmp_path, write_config):
    path = write_config({"storage": {"board_url": "postgres://ops:s3cretpw@db.example:5432/board"},
                         "ui": {"port": 9000}})
    env = {"SPARKOPS_DISPATCH_FAILURE_LIMIT": "4",
           "SPARKOPS_STORAGE_OPS_URL": "postgresql+psycopg://ops:0th3rpw@db.example/ops"}
    result = run_cli("config", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "s3cretpw" not in result.stdout + result.stderr
    assert "0th3rpw" not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    assert shown["source"] == str(path)
    values = shown["settings"]
    assert set(values) == set(SETTINGS_BY_KEY)
    assert values["storage.board_url"] == "postgresql://ops:***@db.example:5432/board"
    assert values["storage.ops_url"] == "postgresql+psycopg://ops:***@db.example/ops"
    assert values["ui.port"] == 9000
    assert values["dispatch.failure_limit"] == 4
    assert values["runner.log_file"] == str(tmp_path / "data" / "logs" / "jobs_runner.log")
    assert values["ui.allow_unauthenticated_remote"] is False

    text = run_cli("config", cwd=tmp_path, env=env)
    assert text.returncode == 0, text.stderr
    assert "s3cretpw" not in text.stdout and "0th3rpw" not in text.stdout
    assert "ui.port = 9000" in text.stdout


def test_cli_config_with_no_file_shows_defaults_and_creates_nothing(tmp_path):
    result = run_cli("config", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert "defaults" in shown["source"]
    assert shown["settings"]["storage.board_url"] == f"sqlite:///{tmp_path}/data/kanban.db"
    assert shown["settings"]["runner.promote_interval_seconds"] == 5.0
    assert list(tmp_path.iterdir()) == []


def test_cli_config_option_resolves_paths_against_that_file(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "sparkops.toml").write_text('[storage]\nboard_url = "sqlite:///b.db"\n')
    result = run_cli("--config", "conf/sparkops.toml", "config", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["storage.board_url"] == f"sqlite:///{conf}/b.db"


def test_list_settings_from_file_and_environment(tmp_path, write_config):
    write_config(text_='[dispatch]\nagent_argv = ["claude", "-p", "{prompt_file}"]\n')
    settings = load_settings(cwd=tmp_path, env={})
    assert settings["dispatch.agent_argv"] == ["claude", "-p", "{prompt_file}"]
    settings = load_settings(cwd=tmp_path, env={
        "SPARKOPS_DISPATCH_AGENT_ARGV": '["{python}", "-m", "sparkops", "demo-agent"]'})
    assert settings["dispatch.agent_argv"] == ["{python}", "-m", "sparkops", "demo-agent"]
    assert load_settings(cwd=tmp_path / "nowhere", env={})["dispatch.agent_argv"] == []


@pytest.mark.parametrize("text, fragment", [
    ('[dispatch]\nagent_argv = "claude -p"\n', "dispatch.agent_argv must be a list of strings"),
    ('[dispatch]\nagent_argv = ["claude", 3]\n', "dispatch.agent_argv must be a list of strings"),
    ('[dispatch]\nmode = "turbo"\n', "dispatch.mode must be one of 'native', 'hermes', 'off'"),
])
def test_list_and_choice_settings_are_checked(tmp_path, write_config, text, fragment):
    write_config(text_=text)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_settings(cwd=tmp_path, env={})


def test_list_setting_from_environment_must_be_a_json_array(tmp_path):
    with pytest.raises(ConfigError, match="SPARKOPS_DISPATCH_AGENT_ARGV") as err:
        load_settings(cwd=tmp_path, env={"SPARKOPS_DISPATCH_AGENT_ARGV": "claude -p x"})
    assert "JSON array" in str(err.value)


def test_optional_string_may_be_empty(tmp_path):
    assert load_settings(cwd=tmp_path, env={"SPARKOPS_HOST_NAME": ""})["host.name"] == ""
    assert load_settings(cwd=tmp_path, env={"SPARKOPS_HOST_NAME": "gb10-a"})["host.name"] == "gb10-a"


# -- services ---------------------------------------------------------------------------


def test_default_services_describe_the_seeds_stack(tmp_path):
    services = {s.name: s for s in load_settings(env={"SPARKOPS_UI_PORT": "8600"}, cwd=tmp_path).services}
    assert set(services) == {"vllm", "gateway", "redis", "ui", "tunnel"}
    assert services["vllm"].check == "vllm" and services["vllm"].url == "http://127.0.0.1:8000"
    assert services["ui"].url == "http://127.0.0.1:8600/_stcore/health"  # follows ui.port
    assert all(s.restart_argv == () for s in services.values())  # nothing restarts until configured


def test_services_from_the_file_change_defaults_and_add_new_ones(tmp_path, write_config):
    write_config(text_='[services.vllm]\nurl = "http://127.0.0.1:8001"\nrestart_argv = ["true"]\n\n'
                       '[services.tunnel]\nenabled = false\n\n'
                       '[services.kanban]\ncheck = "tcp"\nport = 3000\n')
    services = {s.name: s for s in load_settings(env={}, cwd=tmp_path).services}
    assert services["vllm"].url == "http://127.0.0.1:8001" and services["vllm"].check == "vllm"
    assert services["vllm"].restart_argv == ("true",)
    assert services["tunnel"].enabled is False
    assert services["kanban"].port == 3000


@pytest.mark.parametrize("service, fragment", [
    ('check = "ftp"', "services.x.check must be one of 'http', 'tcp', 'redis', 'process', 'vllm'"),
    ('check = "http"\nurl = "localhost:8000/health"', "services.x.url must be an http:// or https:// URL"),
    ('check = "http"\nurl = "http://127.0.0.1:80a0/"', "services.x.url has a malformed port"),
    ('check = "tcp"', "services.x.port must be a port from 1 to 65535"),
    ('check = "process"\npattern = "ssh ("', "services.x.pattern is not a valid regular expression"),
    ('check = "tcp"\nport = 1\nrestart_argv = ["/opt/nowhere/start.sh"]',
     "services.x.restart_argv runs '/opt/nowhere/start.sh', which does not exist"),
    ('check = "tcp"\nport = 1\nrestart_argv = ["no-such-program-anywhere"]', "does not exist"),
    ('check = "tcp"\nport = 1\nrestart_limit = 0', "services.x.restart_limit must be an integer >= 1"),
    ('check = "tcp"\nport = 1\ncolour = "blue"', "unknown field services.x.colour"),
])
def test_bad_services_are_refused_at_start_up(tmp_path, write_config, service, fragment):
    path = write_config(text_=f"[services.x]\n{service}\n")
    message = config_error(env={}, cwd=tmp_path)
    assert fragment in message and str(path) in message


@pytest.mark.parametrize("name, value, fragment", [
    ("SPARKOPS_DISK_THRESHOLD_PERCENT", "120", "disk.threshold_percent must be a number from 1 to 100"),
    ("SPARKOPS_GPU_ZOMBIE_THRESHOLD_GB", "0", "gpu.zombie_threshold_gb must be a number >= 0.001"),
    ("SPARKOPS_ALERTS_WEBHOOK_URL", "hooks.example/x", "alerts.webhook_url must be an http:// or https:// URL"),
    ("SPARKOPS_SERVICES", "[1, 2]", "services must be tables"),
    ("SPARKOPS_SERVICES", "{not json", "SPARKOPS_SERVICES must be a JSON object"),
])
def test_watchdog_settings_out_of_range_name_the_setting(tmp_path, name, value, fragment):
    assert fragment in config_error(env={name: value}, cwd=tmp_path)


def test_a_bad_service_stops_the_runner_before_anything_is_created(tmp_path, write_config):
    write_config(text_='[services.vllm]\nrestart_argv = ["/opt/nowhere/start-vllm.sh"]\n')
    result = subprocess.run([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")},
                                 "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "services.vllm.restart_argv" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()
