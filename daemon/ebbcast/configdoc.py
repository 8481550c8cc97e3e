"""``docs/configuration.md``, written from the schema in ``ebbcast.config``.

``make docs`` runs ``python -m ebbcast.configdoc > docs/configuration.md``; a test
fails when the committed file and the schema disagree, so the reference cannot go
stale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ebbcast.config import ENV_PREFIX, SECTIONS, Config, is_reloadable, toml_value

_KINDS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
          "duration": "duration", "list": "list of strings"}

_INTRO = """# Configuration reference

<!-- Written by `make docs` from the schema in daemon/ebbcast/config.py: do not edit.
     tests/test_config.py fails when this file and the schema disagree. -->

ebbcast reads one TOML file (`ebbcast serve --config PATH`; `config/ebbcast.toml` in
the repository lists every key with its default). Every key can also be set by an
environment variable, `EBBCAST_<SECTION>_<KEY>` in capitals, and a few by a
command-line flag. Highest first: flag, environment, file, built-in default. Every
value is checked at start (`ebbcast check-config PATH` runs the same checks without
starting): each problem names its key, and any problem stops the start with exit 2.

Durations are a number of seconds or a string with a unit: `"250ms"`, `"10s"`,
`"30m"`, `"1h"`. In the environment, booleans are `true`/`false` (or `1`/`0`,
`yes`/`no`, `on`/`off`) and lists are a JSON list (`["https://a.example"]`) or
comma-separated.

Kubernetes gives a pod variables for every Service of its namespace (service links),
and a Service named `ebbcast...` gives it `EBBCAST_...` ones: `EBBCAST_SERVICE_HOST`,
`EBBCAST_PORT=tcp://...`, `EBBCAST_ADMIN_PORT=tcp://...` for a Service `ebbcast-admin`.
Those are ignored, whatever their name (a `tcp://` address is never a setting's
value), and named in one log line at start; any other unknown `EBBCAST_` variable
is an error.

`admin.token_file`, `auth.jwt_key_file` and `auth.jwt_public_key_file` are read with
the configuration, at start and at each SIGHUP; a file that cannot be used makes
that reload fail (logged), and the secrets in use stay.

SIGHUP reloads the file and applies the keys marked *reload* below to the running
daemon and every worker; a changed key that is not marked is logged as needing a
restart (or an upgrade, SIGUSR2, which starts new processes with the
new file; only the listening addresses need a restart). An invalid file changes
nothing and is logged.
"""


def _default(kind: str, value: object) -> str:
    text = toml_value(kind, value)  # type: ignore[arg-type]
    return f"`{text}`"


def render(flags: Mapping[str, str]) -> str:
    """The whole reference; ``flags`` maps a command-line flag to the key it sets."""
    by_key = {key: flag for flag, key in flags.items()}
    defaults = Config()
    lines = [_INTRO]
    for section, cls in SECTIONS.items():
        lines += [f"## [{section}]", "",
                  "| key | type | default | reload | environment / flag | what it does |",
                  "|---|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            kind = f.metadata["kind"]
            env = f"`{ENV_PREFIX}{key.replace('.', '_').upper()}`"
            if key in by_key:
                env += f", `--{by_key[key].replace('_', '-')}`"
            doc = str(f.metadata["doc"]).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_KINDS.get(kind, kind)} | "
                         f"{_default(kind, defaults.value(key))} | "
                         f"{'reload' if is_reloadable(key) else 'restart'} | {env} | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    from ebbcast.cli import SERVE_FLAGS

    print(render(SERVE_FLAGS), end="")
