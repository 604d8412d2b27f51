"""The recipe's command line read into a plain dict: `-c PATH.yaml` plus `--section.key=value` overrides.

The YAML file and every override value are read with the same strict YAML rules: booleans are `true`/`false` only
(`no`, `on` stay strings), `null` is null and `1e-3` is a float. Checking the keys is `config.parse_config`'s job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from nemo_automodel_dspark.options import ConfigError, rule


class _StrictLoader(yaml.SafeLoader):
    """YAML 1.1 minus its surprises: only true/false are booleans (`no`, `on` stay strings); `1e-3` is a float."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_value(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from err


def _overrides(argv: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """`-c PATH --a.b=v --c.d v` → (PATH, [(a.b, v), (c.d, v)])."""
    path, pairs, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        if token in ("-c", "--config"):
            rule(i + 1 < len(argv), f"{token} needs a YAML path")
            path, i = argv[i + 1], i + 2
        elif token.startswith("--") and "=" in token:
            key, value = token[2:].split("=", 1)
            pairs.append((key, value))
            i += 1
        elif token.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((token[2:], argv[i + 1]))
            i += 2
        else:
            raise ConfigError(f"cannot read argument {token!r}; write overrides as --section.key=value")
    if path is None:
        raise ConfigError("no config file; pass -c PATH.yaml")
    return path, pairs


def load_config(argv: list[str]) -> dict:
    """The YAML named by `-c` with the command line's `--section.key=value` overrides applied, values as typed."""
    path, pairs = _overrides(argv)
    if not Path(path).is_file():
        raise ConfigError(f"-c {path}: no such file")
    raw = _yaml_value(Path(path).read_text(), path)
    rule(isinstance(raw, dict), f"{path}: expected a mapping of sections")
    for dotted, text in pairs:
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            rule(isinstance(node, dict), f"--{dotted}: '{part}' is not a section")
        node[leaf] = _yaml_value(text, f"--{dotted}")
    return raw
