"""Command line -> :class:`~megatron_qsparse.config.Config`.

The parser is generated from the dataclasses in :mod:`megatron_qsparse.config`: every field is one
flag with Megatron-LM's spelling and a one-line help text. A YAML file given with ``--config`` sets
defaults (keys are flag names without dashes, ``num-layers`` or ``num_layers``, optionally grouped
under section names); flags on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing

from megatron_qsparse.config import SECTIONS, Config, ConfigError, validate
from megatron_qsparse.data.validation import validate_data
from megatron_qsparse.sparsity import methods

_DESCRIPTION = ("Pretrain, continue-train or fine-tune a fully sparsely-activated (Q-Sparse) "
                "LLaMA-style model with DeepSpeed.")


def json_file(path: str) -> dict:
    """A flag whose value is a JSON file holding an object (``--qsparse-calibration``)."""
    if isinstance(path, dict):  # a mapping given directly in a --config YAML file
        return path
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise ValueError(f"cannot read {path!r} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


json_file.__name__ = "JSON file"


def _base_type(tp: typing.Any):
    """``int | None`` -> int, ``float`` -> float, ``list`` -> str (items), ``dict`` -> a JSON file."""
    if isinstance(tp, str):
        tp = eval(tp, {"list": list, "dict": dict})  # annotations are strings under __future__
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {list: str, dict: json_file}.get(base, base)


def _choices(section: str, name: str, meta) -> tuple | None:
    """A field's choices; ``--qsparse-mode``'s are the registered sparsifier methods."""
    if (section, name) == ("qsparse", "mode"):
        return methods.method_names()
    return meta.get("choices")


def _help(section: str, name: str, meta) -> str:
    if (section, name) == ("qsparse", "mode"):
        return "Sparsifier on linear inputs: " + "; ".join(
            f"{n}: {methods.get_method(n).help}" for n in methods.method_names()) + "."
    return meta["help"]


def _dest(section: str, name: str) -> str:
    return f"{section}.{name}"


def build_parser() -> argparse.ArgumentParser:
    """The full parser, one argument group per configuration section."""
    parser = argparse.ArgumentParser(
        prog="pretrain_qsparse.py", description=_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML file of settings; command-line flags override it.")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK from the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="Set by the deepspeed launcher; the LOCAL_RANK variable is used.")
    defaults = Config()
    for section in SECTIONS:
        obj = getattr(defaults, section)
        group = parser.add_argument_group(section, type(obj).__doc__.strip().splitlines()[0])
        for f in dataclasses.fields(obj):
            meta = f.metadata
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            names = [flag, *meta.get("aliases", ())]
            default = getattr(obj, f.name)
            kw: dict = {"dest": _dest(section, f.name), "help": _help(section, f.name, meta),
                        "default": default}
            base = _base_type(f.type)
            choices = _choices(section, f.name, meta)
            if base is bool:
                kw["action"] = "store_false" if default else "store_true"
            else:
                kw["type"] = base
                if choices:
                    kw["choices"] = choices
                if meta.get("nargs"):
                    kw["nargs"] = meta["nargs"]
                if not choices:
                    kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            group.add_argument(*names, **kw)
    return parser


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Map a YAML file's keys to parser destinations, with clear errors."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} not found; give the path of a YAML file")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]}); "
                              "fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag: value")
    by_flag: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            by_flag[opt.lstrip("-").replace("_", "-")] = action
    flat: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        action = by_flag.get(str(key).replace("_", "-"))
        if action is None or action.dest in ("help", "config", "local_rank"):
            raise ConfigError(f"--config: unknown key {key!r} in {path}; use a flag name of "
                              "pretrain_qsparse.py --help without the dashes")
        if isinstance(action, argparse._StoreFalseAction):
            value = not value  # YAML says e.g. `no-ste: true`
        elif action.type is not None and value is not None:
            try:
                value = ([action.type(v) for v in value] if isinstance(value, list)
                         else action.type(value))
            except (TypeError, ValueError):
                raise ConfigError(f"--config: {key}={value!r} in {path} is not a valid "
                                  f"{action.type.__name__}") from None
        if action.choices and value not in action.choices:
            raise ConfigError(f"--config: {key}={value!r} in {path} is not one of "
                              f"{list(action.choices)}")
        out[action.dest] = value
    return out


def namespace_to_config(ns: argparse.Namespace) -> Config:
    cfg = Config()
    for dest, value in vars(ns).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    return cfg


def parse(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """Parse and validate. Errors exit with status 2 and one line (argparse convention)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    try:
        if pre.config:
            parser.set_defaults(**_yaml_defaults(parser, pre.config))
        ns = parser.parse_args(argv)
        cfg = validate(namespace_to_config(ns), world_size=world_size)
        validate_data(cfg.data)
        return cfg
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
