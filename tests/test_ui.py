"""The Streamlit pages, rendered in process with Streamlit's AppTest over a real
SQLite board: what they show, their filters, the error box and the login gate."""

from __future__ import annotations

from pathlib import Path

from conftest import make_settings, run_page


def seeded(tmp_path: Path) -> None:
    from sparkops.demo.sprint import seed_demo
    from sparkops.storage.store import open_store

    store = open_store(make_settings(tmp_path), create=True)
    try:
        seed_demo(store.board)
    finally:
        store.dispose()


def test_home_shows_counts_banner_and_events(app_env):
    seeded(app_env)
    at = run_page("Home.py")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["✅ Done"] == "2" and metrics["⏳ Todo"] == "6" and metrics["⛔ Blocked"] == "1"
    assert metrics["Open tasks"] == "8" and metrics["Active runs"] == "0"
    assert metrics["Longest ready wait"].endswith("m")  # the demo's ready task has waited for hours
    assert any("Unauthenticated, bound to localhost" in i.value for i in at.info)
    assert len(at.dataframe) == 1  # recent events; no active runs


def test_board_page_columns_and_filter(app_env):
    seeded(app_env)
    at = run_page("pages/1_Board.py")
    assert not at.exception
    headers = [m.value for m in at.markdown if m.value.startswith("**") and " · " in m.value
               and "`t_" not in m.value]
    assert headers == ["**⏳ Todo** · 6", "**▶️ Ready** · 1", "**🟢 Running** · 0",
                       "**⛔ Blocked** · 1", "**✅ Done** · 2"]
    at.text_input[0].input("matching").run()
    cards = [m.value for m in at.markdown if "`t_" in m.value]
    assert len(cards) == 1 and "Order matching engine" in cards[0]
    at.text_input[0].input("").run()
    at.selectbox[0].select("tester").run()
    assert at.caption[0].value == "2 of 10 tasks"


def test_pages_show_an_error_box_when_the_board_is_not_a_database(app_env):
    (app_env / "data").mkdir()
    (app_env / "data" / "kanban.db").write_text("not a database\n")
    for path in ("Home.py", "pages/1_Board.py"):
        at = run_page(path)
        assert not at.exception
        assert [e.value for e in at.error] and "is not a SQLite database" in at.error[0].value


def test_pages_ask_for_the_password_when_one_is_set(app_env, monkeypatch):
    seeded(app_env)
    monkeypatch.setenv("SPARKOPS_UI_PASSWORD", "s3cret")
    at = run_page("Home.py")
    assert not at.metric  # nothing shown before logging in
    at.text_input[0].input("wrong")
    at.button[0].click().run()
    assert not at.metric and at.error[0].value == "Wrong password."
    at.text_input[0].input("s3cret")
    at.button[0].click().run()
    assert at.metric and not [i for i in at.info if "unauthenticated" in i.value]  # no such banner


def test_nothing_but_the_login_form_shows_before_the_gate(app_env, monkeypatch):
    """A broken board's error names its path: it must not reach a visitor who has not
    logged in."""
    (app_env / "data").mkdir()
    (app_env / "data" / "kanban.db").write_text("not a database\n")
    monkeypatch.setenv("SPARKOPS_UI_PASSWORD", "s3cret")
    at = run_page("Home.py")
    assert not at.exception and not at.error
    assert [t.label for t in at.text_input] == ["Password"]
    assert str(app_env) not in " ".join(m.value for m in at.markdown)


def test_wrong_passwords_are_throttled(app_env, monkeypatch):
    from sparkops.ui import page

    monkeypatch.setattr(page, "_login_failures", [])
    seeded(app_env)
    monkeypatch.setenv("SPARKOPS_UI_PASSWORD", "s3cret")
    at = run_page("Home.py")
    for _ in range(page.LOGIN_FREE_TRIES):
        at.text_input[0].input("guess")
        at.button[0].click().run()
        assert at.error[0].value == "Wrong password."
    at.text_input[0].input("s3cret")  # even the right one waits now
    at.button[0].click().run()
    assert at.error[0].value.startswith("Too many wrong passwords: try again in ") and not at.metric
    monkeypatch.setattr(page, "_login_failures", [])  # the pause is over
    at.text_input[0].input("s3cret")
    at.button[0].click().run()
    assert at.metric
