"""Loading a config: defaults < YAML file(s) < dotted ``key=value`` overrides, and a run's
saved config.yaml read as data.

The library refuses unknown keys and wrong types; this module only turns those refusals into
messages that name the key and its closest matches, and checks the closed choices (the value
ranges are resnet/config/validate.py's).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from resnet.config.tree import Config, ConfigError
from resnet.config.validate import check_choices


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if OmegaConf.is_config(value):
            keys.extend(_all_keys(value, dotted + "."))
    return keys


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        known = _all_keys(OmegaConf.structured(Config))
        close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        group = str(key).rsplit(".", 1)[0] if "." in str(key) else ""
        siblings = [k.split(".", 1)[1] for k in known if k.startswith(group + ".")] if group else []
        if siblings and "." not in str(key).split(".", 1)[1]:
            hint += f" ({group} has: {', '.join(siblings)})"
        return ConfigError(f"{source}: unknown config key {key!r}{hint}")
    if isinstance(exc, ValidationError):
        detail = str(exc).splitlines()[0]
        return ConfigError(f"{source}: wrong value for {key!r}: {detail}")
    return ConfigError(f"{source}: {exc}")


def load_config(
    files: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> Config:
    """Merge defaults, then each YAML file, then ``key=value`` overrides; validate."""
    cfg = OmegaConf.structured(Config)
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if item.endswith("="):  # `data.val=` clears a setting; OmegaConf would read it as null
            item += "''"
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override {item!r}") from None
    check_choices(cfg)
    return OmegaConf.to_object(cfg)


def explicit_keys(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> dict[str, str]:
    """Each dotted key the YAML files or the ``key=value`` overrides set, with where (the
    last one wins, as in `load_config`): what a launcher's setting must not silently replace."""
    where: dict[str, str] = {}
    for path in files:
        node = OmegaConf.load(Path(path))
        for key in _all_keys(node):
            if not OmegaConf.is_config(OmegaConf.select(node, key)):
                where[key] = str(path)
    for item in overrides:
        where[item.split("=", 1)[0]] = "the command line"
    return where


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases, which could make a small file expand into billions
    of values: a saved config never has them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"an alias (*name) at {self.peek_event().start_mark}: not "
                                 f"allowed in a saved config")
        return super().compose_node(parent, index)


def _as_written(node: Any) -> Any:
    """YAML data with each string escaped so that OmegaConf keeps it as written: `${...}` is
    an interpolation to OmegaConf, and its resolvers read the environment (oc.env) and more."""
    if isinstance(node, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", node)
    if isinstance(node, dict):
        return {key: _as_written(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_as_written(value) for value in node]
    return node


def load_saved_config(path: str | Path) -> Config:
    """A config.yaml found in a run folder, an export or a Hub download: data, not a recipe.
    Its values are taken as written (no interpolation, no resolver runs), then validated like
    any config."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds no mapping of config keys")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(_as_written(data)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path)) from None
    check_choices(cfg)
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
