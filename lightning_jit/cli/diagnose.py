"""Why a command line did not parse: the flag at fault, found by checking the given flags one by one.

LightningCLI's parser reports a bad value as a multi-line dump (the usage of every ``--trainer.*`` flag, then the
message). :func:`explain` instead walks what was given (flags, and the keys of ``--config`` files) and checks each one
on its own against the declaration it belongs to, so that the error names the flag without reading any message:

1. a key of the previous version (:mod:`lightning_jit.cli.migration`): where it moved, or that it was removed;
2. a key that the group's declaration (``jit``, ``batch``, ``guard``, ``forget``) does not have, with the closest one;
3. a value of the wrong type, checked by a parser of that one field (the same typing LightningCLI applies);
4. a ``model``/``data`` ``class_path`` that cannot be imported;
5. a flag that no option of the subcommand's parser takes.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_jit.cli.checkpoints import import_class
from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.cli.migration import check_key

__all__ = ["Given", "explain", "given_values"]

_CONFIG_FLAGS = ("--config", "-c")
_CLASS_PATH_KEYS = ("model", "data", "model.class_path", "data.class_path")


@dataclass(frozen=True)
class Given:
    """One value given to a subcommand: its dotted ``key``, the ``value`` and where it was given.

    ``flag`` is how the error names it: ``--jit.sigma`` on the command line, ``jit.sigma (in cfg.yaml)`` in a file.
    ``text`` is True for a command-line string (parsed as the command line parses it), False for a loaded value.
    """

    key: str
    value: Any
    flag: str
    text: bool


def given_values(args: list[str] | Mapping[str, Any], groups: Collection[str] = ()) -> list[Given]:
    """Everything given to a subcommand: its flags, and the keys of the config files it names (``--config`` and, for
    the ``groups``, ``--<group> file``).

    Example:
        >>> [(g.key, g.value, g.flag) for g in given_values(["--jit.sigma=0.1", "--guard.max_drop", "-1"])]
        [('jit.sigma', '0.1', '--jit.sigma'), ('guard.max_drop', '-1', '--guard.max_drop')]
    """
    if isinstance(args, Mapping):
        return list(_flatten(dict(args), "", lambda key: key, text=False))
    found: list[Given] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or _is_number(token):
            continue
        flag, has_value, value = token.partition("=")
        if not has_value:
            if i < len(args) and (not args[i].startswith("-") or _is_number(args[i])):
                value = args[i]
                i += 1
            else:
                value = None
        if flag in _CONFIG_FLAGS:
            found.extend(_config_values(value, ""))
            continue
        key = flag.lstrip("-")
        if key in groups and value is not None and _is_file(value):
            found.extend(_config_values(value, key))  # `--jit cfg.yaml`: a group's own config file
            continue
        found.append(Given(key, value, flag, text=True))
    return found


def explain(
    given: list[Given],
    groups: Mapping[str, type],
    scalars: Mapping[str, inspect.Parameter],
    options: Collection[str] = (),
) -> JiTUsageError | None:
    """The usage error for the first value in ``given`` that is wrong on its own, or ``None`` if none is.

    Args:
        given: What was given (:func:`given_values`).
        groups: The dataclass-typed argument groups (``{"jit": JiTSettings, ...}``).
        scalars: The other typed arguments of the subcommand (``ckpt_path``, ``output``...), by name.
        options: The option strings of the subcommand's parser; a flag that none of them takes is unknown. Empty:
            flags outside the groups are not checked.

    Example:
        >>> from lightning_jit.core.guard import GuardSettings
        >>> err = explain(given_values(["--guard.check_every=abc"]), {"guard": GuardSettings}, {})
        >>> err.flag, err.message
        ('--guard.check_every', "expects int, got 'abc'.")
    """
    for item in given:
        check_key(item.key, item.flag)
    for item in given:
        group, _, name = item.key.partition(".")
        if group in groups and name:
            field_names = [f.name for f in dataclasses.fields(groups[group])]
            if name not in field_names:
                close = difflib.get_close_matches(name, field_names, n=1)
                hint = f" Did you mean {group}.{close[0]}?" if close else f" It takes: {', '.join(field_names)}."
                return JiTUsageError(item.flag, f"is not a setting of {groups[group].__name__}.{hint}")
    for item in given:
        group, _, name = item.key.partition(".")
        if group in groups and name:
            if not _parses(item, group, groups[group], name):
                return JiTUsageError(item.flag, f"expects {_type_text(groups[group], name)}, got {item.value!r}.")
        elif item.key in scalars and not _parses_scalar(item, scalars[item.key]):
            return JiTUsageError(item.flag, f"expects {_hint_text(scalars[item.key].annotation)}, got {item.value!r}.")
    for item in given:
        if item.key in _CLASS_PATH_KEYS and isinstance(item.value, str) and "." in item.value:
            root = item.key.split(".")[0]
            try:
                import_class(item.value, item.flag, what=f"{root}.class_path" if item.key == root else "")
            except JiTUsageError as err:
                return err
    for item in given:
        if options and item.text and not _takes(options, item.flag):
            close = difflib.get_close_matches(item.flag, list(options), n=1)
            hint = f" Did you mean {close[0]}?" if close else " See --help."
            return JiTUsageError(item.flag, f"is not an option.{hint}")
    return None


def _takes(options: Collection[str], flag: str) -> bool:
    """Whether a parser with these option strings takes ``flag``: as itself, as an abbreviation (as argparse allows),
    or as a nested key of a class-typed option (``--model.lr`` under ``--model``, which has ``--model.help``)."""
    if flag in options or any(option.startswith(flag) for option in options):
        return True
    parts = flag.split(".")
    return any(
        ".".join(parts[:i]) in options and f"{'.'.join(parts[:i])}.help" in options for i in range(1, len(parts))
    )


# ----------------------------------------------------------------------------------------------------------------------
# What was given
# ----------------------------------------------------------------------------------------------------------------------
def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):
        return False


def _config_values(value: str | None, prefix: str) -> Iterator[Given]:
    if value is None:
        return
    if _is_file(value):
        try:
            loaded = yaml.safe_load(Path(value).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return  # the parser reports an unreadable file itself
        where = value
    else:
        try:
            loaded = yaml.safe_load(value)  # a config given inline
        except yaml.YAMLError:
            return
        where = "--config"
    if isinstance(loaded, dict):
        root = f"{prefix}." if prefix else ""
        yield from _flatten(loaded, root, lambda key: f"{key} (in {where})", text=False)


def _flatten(config: dict[str, Any], prefix: str, name: Any, text: bool) -> Iterator[Given]:
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and "class_path" not in value and dotted.count(".") == 0:
            yield from _flatten(value, f"{dotted}.", name, text)
        elif isinstance(value, dict) and "class_path" in value:
            yield Given(f"{dotted}.class_path", value["class_path"], name(f"{dotted}.class_path"), text)
        else:
            yield Given(dotted, value, name(dotted), text)


# ----------------------------------------------------------------------------------------------------------------------
# One value on its own
# ----------------------------------------------------------------------------------------------------------------------
def _parses(item: Given, group: str, declaration: type, name: str) -> bool:
    """Whether a parser of this one field (the typing LightningCLI applies to it) accepts the value."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    others = {f.name for f in dataclasses.fields(declaration) if f.name != name}
    parser.add_class_arguments(declaration, group, skip=others, instantiate=False)
    return _accepts(parser, f"{group}.{name}", item)


def _parses_scalar(item: Given, parameter: inspect.Parameter) -> bool:
    from jsonargparse import ArgumentParser

    if parameter.annotation is inspect.Parameter.empty:
        return True
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{parameter.name}", type=parameter.annotation)
    return _accepts(parser, parameter.name, item)


def _accepts(parser: Any, key: str, item: Given) -> bool:
    import argparse

    try:
        if item.text:
            parser.parse_args([f"--{key}={item.value}"] if item.value is not None else [f"--{key}"])
        else:
            parser.parse_object(_nest(key, item.value))
    except (argparse.ArgumentError, TypeError, ValueError, KeyError):
        return False
    return True


def _nest(key: str, value: Any) -> dict[str, Any]:
    head, _, rest = key.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _type_text(declaration: type, name: str) -> str:
    try:
        return _hint_text(typing.get_type_hints(declaration)[name])
    except Exception:  # noqa: BLE001 - an annotation that does not resolve is shown as written
        return str(next(f.type for f in dataclasses.fields(declaration) if f.name == name))


def _hint_text(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_text(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))
