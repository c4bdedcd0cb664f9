"""Config values as they arrive from the command line.

``python -m monai.bundle run ... --tta false`` hands the config the *string*
``"false"`` (Fire converts only ``False``), and ``bool("false")`` is True. Every
boolean setting therefore goes through :func:`flag`.
"""

from __future__ import annotations

__all__ = ['check_overrides', 'flag', 'refuse_none_values', 'refuse_unknown_keys']


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "none", "")


def flag(value, name: str = "value") -> bool:
    """``value`` as a bool: bools, 0/1, None (False) and the strings true/false, yes/no,
    on/off, 1/0 in any case. Anything else raises a ValueError naming ``name``."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}.")


# options of ``python -m monai.bundle run`` itself (monai.bundle.scripts.run and ConfigWorkflow), not config keys
_RUN_OPTIONS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
                          "workflow_type", "workflow_name", "properties_path"})


def _config_ids(content, prefix: str = "") -> set[str]:
    """Every id of a parsed config: ``a``, ``a#b``, ``a#0#c``, ... (``#`` separated)."""
    ids = set()
    items = content.items() if isinstance(content, dict) else enumerate(content) if isinstance(content, list) else ()
    for key, value in items:
        id_ = f"{prefix}{key}"
        ids.add(id_)
        ids |= _config_ids(value, id_ + "#")
    return ids


def _parse_cli(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Fire-style ``--key value`` / ``--key=value`` pairs of ``argv`` -> (positional args, {key: value})."""
    positional, pairs, i = [], {}, 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            key = key.replace("::", "#")
            pairs[key.replace("-", "_") if key.replace("-", "_") in _RUN_OPTIONS else key] = value
        else:
            positional.append(token)
        i += 1
    return positional, pairs


def check_overrides(argv: list[str] | None = None) -> None:
    """Refuse command-line overrides that name no key of the config files.

    ``python -m monai.bundle run training --config_file bundle/configs/train.json --epoch 3``
    would otherwise add a new, unused key ``epoch`` and train for the default 15 epochs.
    The configs' ``initialize`` lists call this first. It reads ``sys.argv`` (or ``argv``)
    only when the program is ``monai.bundle``'s ``run`` command; anything else (tests,
    ``ConfigWorkflow`` used from Python, ``scripts/segment.py``, which checks its own
    options) returns at once.

    An override is accepted when its id (``a#b#c``) exists in the merged config files,
    or when it sets a ``_private_`` key (``_disabled_``, ``_mode_``) of an existing item.

    Raises:
        ValueError: naming the unknown option, the config files, and the closest key.
    """
    import sys

    if argv is None:
        main = sys.argv[0].replace("\\", "/") if sys.argv else ""
        if not main.endswith("monai/bundle/__main__.py"):
            return
        argv = sys.argv[1:]
    positional, pairs = _parse_cli(argv)
    if not positional or positional[0] != "run" or "config_file" not in pairs:
        return
    files = pairs["config_file"]
    if files.strip().startswith("["):
        import ast

        files = ast.literal_eval(files)
    refuse_unknown_keys([k for k in pairs if k not in _RUN_OPTIONS], files,
                        "New keys can only be added by a config file (--config_file \"['train.json', 'mine.json']\").")
    refuse_none_values({k: v for k, v in pairs.items() if k not in _RUN_OPTIONS})


def refuse_none_values(pairs: dict[str, str]) -> None:
    """Raise for a command-line override whose value is ``None``.

    Fire turns ``--key None`` into Python's None, and ``monai.bundle run`` drops every
    override that is None (``update_kwargs(ignore_none=True)``): the config's own value
    would be used without a word. The config expression ``'$None'`` does set None.

    Args:
        pairs: ``{key: value as typed}`` from the command line.

    Raises:
        ValueError: naming the option and the spelling that works.
    """
    for key, value in pairs.items():
        if value.strip() == "None":
            raise ValueError(
                f"--{key} None: monai.bundle run drops overrides whose value is None, so {key} would keep its config value. "
                f"Write --{key} '$None' (a config expression) to set it to None."
            )


def refuse_unknown_keys(keys, config_files, advice: str = "") -> None:
    """Raise for the first of ``keys`` (``a#b#c`` ids) that names nothing in ``config_files``.

    A key is accepted when its id exists in the merged files, or when it sets a
    ``_private_`` key (``_disabled_``, ``_mode_``) of an existing item. Used by
    :func:`check_overrides` and ``scripts/segment.py``.

    Args:
        keys: the ids given on a command line.
        config_files: a config file path or a list of them (merged as MONAI merges them).
        advice: a sentence appended to the error.

    Raises:
        ValueError: naming the option, the config files, and the closest existing id.
    """
    import difflib

    from monai.bundle import ConfigParser

    known = _config_ids(ConfigParser.load_config_files(config_files))
    for key in keys:
        parent, _, last = key.rpartition("#")
        if key in known or (last.startswith("_") and last.endswith("_") and parent in known):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        raise ValueError(f"--{key}: not a key of {config_files}, so it would be silently ignored.{hint} {advice}".rstrip())
