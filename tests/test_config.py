"""Unit: configuration parsing, layering and validation."""

from __future__ import annotations

import pytest

from ebbcast.config import (Config, ConfigError, changed_keys, format_duration, is_reloadable,
                            iter_keys, load_config, merge_reloadable, parse_duration,
                            render_toml)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "ebbcast.toml"
    path.write_text(text)
    return str(path)


def problems(**kwargs) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    return caught.value.problems


@pytest.mark.parametrize("token", ["pâssword", "two words", "tab\there", "\u00a0"])
def test_an_admin_token_that_cannot_travel_in_a_header_is_refused_at_load(token):
    (problem,) = problems(env={"EBBCAST_ADMIN_TOKEN": token})
    assert problem == ("admin.token", "must be printable ASCII without spaces (it is sent "
                                      "in an HTTP header) (from EBBCAST_ADMIN_TOKEN)")


@pytest.mark.parametrize("value, seconds", [
    (10, 10.0), (0, 0.0), (1.5, 1.5), ("250ms", 0.25), ("10s", 10.0), ("30m", 1800.0),
    ("1h", 3600.0), ("2", 2.0), (" 5s ", 5.0), ("0.5s", 0.5),
])
def test_parse_duration_accepts_numbers_and_units(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["-1s", -1, "10 minutes", "s", "", "1d", True, None,
                                   [1], float("inf"), float("nan")])
def test_parse_duration_rejects_garbage(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("seconds, text", [(1800.0, "30m"), (10.0, "10s"), (0.25, "250ms"),
                                           (3600.0, "1h"), (90.0, "90s"), (0.0, "0s")])
def test_format_duration_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_defaults_match_the_spec():
    config = load_config(env={})
    assert (config.server.host, config.server.port, config.admin.port) == ("127.0.0.1", 8000,
                                                                           8001)
    assert config.server.ws_path == "/ws" and config.server.workers == 1
    assert config.server.max_message_bytes == 65536 and config.server.allowed_origins == []
    assert config.broadcast.periodic_interval == 10.0 and config.broadcast.envelope == "json"
    assert config.keepalive.ping_interval == 20.0 and config.keepalive.ping_timeout == 20.0
    assert config.limits.client_queue_bytes == 1048576
    assert (config.limits.messages_per_second, config.limits.burst) == (20.0, 40)
    assert config.shutdown.drain_timeout == 1800.0 and config.shutdown.close_code == 1001
    assert config.backplane.url == "memory://" and config.logging.level == "info"


def test_file_values_are_loaded(tmp_path):
    path = write(tmp_path, '[server]\nport = 9000\nallowed_origins = ["https://a.example"]\n'
                 '[shutdown]\ndrain_timeout = "5m"\n[broadcast]\necho_to_sender = false\n')
    config = load_config(path, env={})
    assert config.server.port == 9000 and config.shutdown.drain_timeout == 300.0
    assert config.server.allowed_origins == ["https://a.example"]
    assert config.broadcast.echo_to_sender is False


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = write(tmp_path, "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[admin]\nport = 9101\n")
    env = {"EBBCAST_SERVER_PORT": "9001", "EBBCAST_ADMIN_TOKEN": "t"}
    config = load_config(path, env=env, overrides={"server.port": "9002"})
    assert config.server.port == 9002           # flag
    assert config.admin.token == "t"            # env
    assert config.server.host == "0.0.0.0"      # file
    assert config.admin.port == 9101            # file
    assert config.logging.level == "info"       # default
    assert load_config(path, env=env).server.port == 9001


def test_env_values_are_parsed_by_kind():
    config = load_config(env={"EBBCAST_BROADCAST_ECHO_TO_SENDER": "no",
                              "EBBCAST_SERVER_ALLOWED_ORIGINS": "https://a.example, *",
                              "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "2.5",
                              "EBBCAST_KEEPALIVE_PING_INTERVAL": "500ms"})
    assert config.broadcast.echo_to_sender is False
    assert config.server.allowed_origins == ["https://a.example", "*"]
    assert config.limits.messages_per_second == 2.5
    assert config.keepalive.ping_interval == 0.5


def test_misspelt_key_and_section_are_named(tmp_path):
    path = write(tmp_path, "[server]\nprot = 9000\n[shutdwn]\ndrain_timeout = 1\n")
    found = dict(problems(path=path, env={}))
    assert "server.prot" in found and "unknown key" in found["server.prot"]
    assert "shutdwn" in found and "unknown section" in found["shutdwn"]


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = write(tmp_path, '[server]\nport = 70000\nworkers = -1\nws_path = "ws"\n'
                 'allowed_origins = "*"\n[shutdown]\ndrain_timeout = "ten minutes"\n'
                 'close_code = 1006\n[logging]\nlevel = "loud"\n[broadcast]\n'
                 'envelope = "xml"\necho_to_sender = "yes"\n')
    keys = [key for key, _ in problems(path=path, env={})]
    assert sorted(keys) == sorted([
        "server.port", "server.workers", "server.ws_path", "server.allowed_origins",
        "shutdown.drain_timeout", "shutdown.close_code", "logging.level",
        "broadcast.envelope", "broadcast.echo_to_sender"])


def test_bad_duration_message_names_key_and_value(tmp_path):
    path = write(tmp_path, '[shutdown]\ndrain_timeout = "30 min"\n')
    (key, reason), = problems(path=path, env={})
    assert key == "shutdown.drain_timeout" and "'30 min'" in reason


def test_invalid_toml_and_missing_file_are_reported(tmp_path):
    path = write(tmp_path, "[server\nport = 1\n")
    (key, reason), = problems(path=path, env={})
    assert key == path and "invalid TOML" in reason
    (key, reason), = problems(path=str(tmp_path / "missing.toml"), env={})
    assert "cannot read" in reason


def test_unknown_env_variable_and_bad_env_value_are_named():
    found = dict(problems(env={"EBBCAST_SERVER_PROT": "1", "EBBCAST_SERVER_PORT": "x"}))
    assert "EBBCAST_SERVER_PROT" in found
    assert "EBBCAST_SERVER_PORT" in found["server.port"]


def test_tls_needs_both_files_that_exist(tmp_path):
    found = dict(problems(env={}, overrides={"server.tls_cert": str(tmp_path / "c.pem")}))
    assert "server.tls_key" in found
    found = dict(problems(env={}, overrides={"server.tls_cert": str(tmp_path / "c.pem"),
                                             "server.tls_key": str(tmp_path / "k.pem")}))
    assert "no such file" in found["server.tls_cert"]


def test_render_toml_loads_back_to_the_same_config(tmp_path):
    config = load_config(env={"EBBCAST_SHUTDOWN_DRAIN_TIMEOUT": "90s",
                              "EBBCAST_SERVER_ALLOWED_ORIGINS": "*"})
    path = write(tmp_path, render_toml(config))
    assert load_config(path, env={}) == config


def test_render_toml_masks_the_token():
    config = load_config(env={"EBBCAST_ADMIN_TOKEN": "hunter2"})
    assert "hunter2" not in render_toml(config)


def test_shipped_config_file_lists_every_key_with_its_default():
    from helpers import REPO

    shipped = (REPO / "config" / "ebbcast.toml").read_text()
    assert load_config(str(REPO / "config" / "ebbcast.toml"), env={}) == Config()
    for key, field in iter_keys():
        section, name = key.split(".")
        assert f"\n{name} = " in shipped, key
        assert f"# {field.metadata['doc']}" in shipped, key


def test_the_configuration_reference_matches_the_schema():
    """docs/configuration.md is written by `make docs`; rerun it after changing a key."""
    from helpers import REPO

    from ebbcast.cli import SERVE_FLAGS
    from ebbcast.configdoc import render

    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == render(SERVE_FLAGS), "docs/configuration.md is stale: run make docs"
    for key, _ in iter_keys():
        section, name = key.split(".")
        assert f"| `{name}` |" in written.split(f"## [{section}]")[1].split("## [")[0], key


def test_reloadable_keys_and_merge():
    assert is_reloadable("broadcast.periodic_text") and is_reloadable("admin.token")
    assert is_reloadable("shutdown.progress_interval") and is_reloadable("logging.level")
    assert not is_reloadable("server.port") and not is_reloadable("shutdown.drain_timeout")
    running = load_config(env={})
    loaded = load_config(env={"EBBCAST_SERVER_PORT": "9999", "EBBCAST_LIMITS_BURST": "5"})
    assert changed_keys(running, loaded) == ["server.port", "limits.burst"]
    merged = merge_reloadable(running, loaded)
    assert merged.server.port == 8000 and merged.limits.burst == 5


def test_unloadable_tls_files_are_a_config_error_naming_the_key(tmp_path):
    from ebbcast.core.sockets import tls_context

    (tmp_path / "c.pem").write_text("not a certificate")
    config = load_config(env={}, overrides={"server.tls_cert": str(tmp_path / "c.pem"),
                                            "server.tls_key": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError) as caught:
        tls_context(config)
    assert caught.value.problems[0][0] == "server.tls_cert"


def test_kubernetes_service_links_are_ignored_and_listed_but_settings_still_count():
    links = {"EBBCAST_SERVICE_HOST": "10.96.0.2", "EBBCAST_SERVICE_PORT": "80",
             "EBBCAST_SERVICE_PORT_WS": "80", "EBBCAST_PORT": "tcp://10.96.0.2:80",
             "EBBCAST_PORT_80_TCP": "tcp://10.96.0.2:80", "EBBCAST_PORT_80_TCP_PROTO": "tcp",
             "EBBCAST_PORT_80_TCP_PORT": "80", "EBBCAST_PORT_80_TCP_ADDR": "10.96.0.2",
             "EBBCAST_ADMIN_PORT": "tcp://10.96.0.3:8001",  # a setting's name, too
             "EBBCAST_ADMIN_SERVICE_PORT_ADMIN": "8001"}
    config = load_config(env={**links, "EBBCAST_SERVER_PORT": "9000"})
    assert config.service_links == tuple(sorted(links))
    assert (config.server.port, config.admin.port) == (9000, 8001)
    # a setting with a setting's value is a setting, and a typo is still an error
    assert load_config(env={"EBBCAST_ADMIN_PORT": "9001"}).admin.port == 9001
    with pytest.raises(ConfigError) as typo:
        load_config(env={**links, "EBBCAST_SERVER_PORTT": "1", "EBBCAST_BACKPLANE_PORT": "6379"})
    # the second has a link's name, but not the value Kubernetes gives such a link
    assert [key for key, _ in typo.value.problems] == ["EBBCAST_BACKPLANE_PORT",
                                                       "EBBCAST_SERVER_PORTT"]
    with pytest.raises(ConfigError) as bad:
        load_config(env={"EBBCAST_ADMIN_PORT": "tcp://nowhere"})  # not a Service's value
    assert [key for key, _ in bad.value.problems] == ["admin.port"]
