"""Command-line parsing shared by the entry points (train.py, segment.py, linprobe.py,
finetune.py through `core/entry.py`, and the decoder ablation): absl's parser, but --help is
exit status 0 (absl: 1) and a bad flag, config file or config override is exit status 2 (bad
input) explained in one message. No flags are defined here."""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

from absl import flags

from mae_jax.core.errors import EXIT_BAD_INPUT, BadInputError

HELP_FLAGS = {"help", "?", "helpshort", "helpfull", "helpxml"}


def asked_for_help(argv: list[str]) -> bool:
    """--help, -help, --help=true, -?, --helpshort, --helpfull, --helpxml: absl prints the
    help, then exits with status 1."""
    return any(arg.startswith("-") and arg.lstrip("-").split("=", 1)[0] in HELP_FLAGS
               for arg in argv[1:])


class CommandLineError(ValueError):
    """A mistake `parse_flags` finds itself; its message is the whole story."""


def command_line_problem(error: BaseException, argv: list[str]) -> str:
    """What went wrong on the command line, without the parsers' wrapping: absl re-raises a
    config file's error inside its own, ml_collections adds the traceback to the text and
    reports an unknown field as an AttributeError holding a KeyError."""
    if isinstance(error, CommandLineError):
        return str(error)
    chain = [error]
    while True:
        last = chain[-1]
        cause = last.__cause__ if last.__cause__ is not None else (
            None if last.__suppress_context__ else last.__context__)
        if cause is None or cause in chain:
            break
        chain.append(cause)
    for link in chain:
        # An unknown field: an AttributeError holding a KeyError (--config.x), or a KeyError
        # (a missing parent, --config.x.y), whose text is "'name'" [+ "\nDid you mean ...?"].
        missing = (link.args[0] if isinstance(link, AttributeError) and link.args
                   and isinstance(link.args[0], KeyError) else link)
        if missing is link and not _raised_in_ml_collections(link):
            continue  # e.g. a KeyError of a config file's own code
        if isinstance(missing, KeyError) and missing.args and isinstance(missing.args[0], str):
            field, _, hint = str(missing.args[0]).partition("\n")
            name = field.strip("'\"")
            given = [flag for flag in (arg.split("=", 1)[0] for arg in argv[1:])
                     if flag.startswith("--") and name in flag.split(".")[1:]]
            return (f"{given[0] if given else name}: the config has no field {field}. "
                    + (hint + " " if hint else "")
                    + "The fields are those its config file sets.")
    root = chain[-1]
    if isinstance(root, OSError) and "config" in str(root):
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        return f"cannot load the --config file: {lines[-1]}"
    text = str(error)
    if "Error whilst parsing config file" in text and isinstance(root, BadInputError):
        return f"{text.split(': Error whilst', 1)[0]}: {root}"  # get_config refused its argument
    if isinstance(error, flags.Error):
        return f"{type(error).__name__}: {error}"
    # An error in a config file's own code: where it happened.
    return "".join(traceback.format_exception(error)).rstrip()


def _raised_in_ml_collections(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "ml_collections" in frames[-1].filename


def parse_flags(flag_values: flags.FlagValues, argv: list[str], *, configs=()) -> list[str]:
    """`flag_values(argv)`, then each config flag in `configs` loaded (a config file that
    failed to load raises on first use). An unknown config field raises AttributeError while
    parsing: every such mistake is "Bad command line: ..." and exit status 2."""
    try:
        try:
            rest = flag_values(argv)
        except SystemExit as stop:  # absl printed the help and exits 1
            sys.exit(0 if stop.code == 1 and asked_for_help(argv) else stop.code)
        for name in configs:
            if flag_values[name].value is not None:
                flag_values[name].value.get("task")
                _refuse_repeated_tuples(flag_values[name].value, name, argv)
            elif flag_values[name].present:  # a file whose get_config() returns nothing
                raise CommandLineError(f"--{name}={flag_values[name].config_filename}: its "
                                       "get_config() returned None; it must return the "
                                       "ConfigDict.")
        if len(rest) > 1:
            raise CommandLineError(f"unexpected arguments {rest[1:]}: every setting is a flag, "
                                   "e.g. --workdir=DIR or --config.total_steps=N.")
        if "workdir" in flag_values and flag_values["workdir"].present and not (
                flag_values["workdir"].value or "").strip():
            raise CommandLineError("--workdir is empty (an unset variable?): give the run "
                                   "directory, or leave the flag out for runs/<config name>.")
        return rest
    except Exception as error:  # noqa: BLE001 - everything here comes from the command line
        bad_command_line(error, argv)


def _refuse_repeated_tuples(config, name: str, argv: list[str]) -> None:
    """ml_collections joins the values of a tuple field given twice ((64,32) then (80,40):
    (64, 32, 80, 40)), where any other field takes the last: refused (QA)."""
    prefix, seen = f"--{name}.", {}
    for index, arg in enumerate(argv[1:], start=1):
        if arg.startswith(prefix):
            field = arg[len(prefix):].split("=", 1)[0]
            seen.setdefault(field, []).append(index)
    for field, places in seen.items():
        if len(places) < 2:
            continue
        value = config
        for part in field.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if isinstance(value, tuple | list):
            raise CommandLineError(
                f"{prefix}{field} is given {len(places)} times: ml_collections joins the "
                f"values of a tuple field (here {tuple(value)}) instead of keeping the last. "
                "Give it once.")


def bad_command_line(error: BaseException, argv: list[str]) -> NoReturn:
    """The one message and exit status 2. Also for a config flag with a default file, which
    ml_collections loads with the command line's overrides while the flag is defined."""
    sys.stderr.write(f"Bad command line: {command_line_problem(error, argv)}\nPass "
                     "--helpshort to see the flags.\n")
    sys.exit(EXIT_BAD_INPUT)
