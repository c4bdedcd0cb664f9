"""The command line of ``python -m monai.bundle run``: config values as they arrive from it,
checks of its overrides, and errors that end with their cause.

``python -m monai.bundle run ... --tta false`` hands the config the *string*
``"false"`` (Fire converts only ``False``), and ``bool("false")`` is True. Every
boolean setting therefore goes through :func:`flag`.

MONAI wraps an error raised in a config expression in ``RuntimeError: Failed to evaluate
ConfigExpression ...``, so the real message sat in the middle of a long traceback.
:func:`check_overrides` (the first step of every config's ``initialize``) therefore installs
:func:`print_root_cause` as ``sys.excepthook``: the traceback, then the cause's one-line message last.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ['cause_chain', 'check_bundle_root', 'check_overrides', 'flag', 'install_excepthook', 'print_root_cause', 'refuse_none_values',
           'refuse_unknown_keys', 'root_cause']


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
    options) returns at once. Under ``monai.bundle`` it also installs :func:`install_excepthook`,
    so this error, and any later one, ends with its one-line message.

    An override is accepted when its id (``a#b#c``) exists in the merged config files,
    or when it sets a ``_private_`` key (``_disabled_``, ``_mode_``) of an existing item.

    Raises:
        ValueError: naming the unknown option, the config files, and the closest key.
    """
    if argv is None:
        main = sys.argv[0].replace("\\", "/") if sys.argv else ""
        if not main.endswith("monai/bundle/__main__.py"):
            return
        install_excepthook()
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


def check_bundle_root(bundle_root, *paths) -> None:
    """Refuse a relative ``bundle_root`` that is not a folder of the current one when any of ``paths``
    (the run's output folder, model file) lies inside it.

    The configs' ``bundle_root`` is ``bundle``, relative to the folder the command runs in: run from
    anywhere but the repository root, training would write a new ``bundle/runs/...`` there.

    Raises:
        ValueError: naming the current folder and ``--bundle_root``.
    """
    root = Path(str(bundle_root))
    if root.is_absolute() or root.is_dir():
        return
    inside = [str(p) for p in paths if p is not None and (Path(str(p)) == root or root in Path(str(p)).parents)]
    if inside:
        raise ValueError(
            f"bundle_root={str(bundle_root)!r} is not a folder of the current folder {os.getcwd()} (it would hold {inside[0]}): "
            "run from the repository root, or pass --bundle_root /path/to/repo/bundle."
        )


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and its explicit causes (``raise ... from e``), outermost first (a cycle ends it)."""
    chain, seen = [error], {id(error)}
    while chain[-1].__cause__ is not None and id(chain[-1].__cause__) not in seen:
        chain.append(chain[-1].__cause__)
        seen.add(id(chain[-1]))
    return chain


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain of explicit causes (``raise ... from e``)."""
    return cause_chain(error)[-1]


def print_root_cause(kind, value, tb) -> None:
    """A ``sys.excepthook``: the usual traceback, then, when the error wraps another (MONAI's
    "Failed to evaluate ConfigExpression"), a last line with the cause's type and message."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()  # open progress bars print now, not after the message
    sys.__excepthook__(kind, value, tb)
    cause = root_cause(value) if isinstance(value, BaseException) else value
    if cause is not value:
        message = " ".join(str(cause).split()) or "(no message)"
        print(f"\n{type(cause).__name__}: {message}", file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Make :func:`print_root_cause` the process's ``sys.excepthook`` (once)."""
    if sys.excepthook is not print_root_cause:
        sys.excepthook = print_root_cause


def run_command(function, prog: str, argv: list[str] | None = None, describe=lambda e: str(root_cause(e))) -> None:
    """Run ``function`` as a Fire command line (``argv``: the arguments, default ``sys.argv[1:]``;
    ``-h``/``--help`` shows its help). An exception ends with ``<prog>: error: <describe(e)>`` on stderr
    and exit status 1 (``describe``: what to tell the user, default the root cause's message)."""
    import fire

    try:
        args = sys.argv[1:] if argv is None else list(argv)
        fire.Fire(function, command=["--", "--help"] if any(a in ("-h", "--help") for a in args) else args)
    except Exception as e:  # noqa: BLE001 - report the cause the bundle wraps, then fail
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        sys.exit(1)
