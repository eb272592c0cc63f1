"""The scripts' settings: tables of flags (nanoGPT's visible config block, argparse from it) and what a continued
run may change.

    MODEL = {"embed_dim": (64, "token width D"), ...}          # name -> (default, help); embed_dim -> --embed-dim
    cfg, given = parse_config("python -m mnist.train", __doc__, {"model": MODEL, "run": RUN}, argv)

Booleans become --name / --no-name; a default of None takes `types[name]` (else str). `given` holds the names
set on the command line, so a continued run can tell a flag the user typed from a default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Table = Mapping[str, tuple[Any, str]]


# Config keys renamed since checkpoints were written: old name -> new; `continue_config` reads both.
RENAMED = {"out": "output", "grad_clip": "clip_grad", "label_smoothing": "smoothing",
           "ema_decay": "model_ema_decay", "drop_path_rate": "drop_path"}


class UsageError(ValueError):
    """A bad setting or combination of settings; the message names it and says what would be right."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say the default and X is a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def flag(name: str) -> str:
    """A config key's command-line flag: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def build_parser(prog: str, description: str, tables: Mapping[str, Table], *, defaults: Mapping[str, Any] = {},
                 choices: Mapping[str, Sequence] = {}, types: Mapping[str, type] = {},
                 aliases: Mapping[str, Sequence[str]] = {}, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one group per table ("model", "recipe", "run", ...); `defaults` override the
    tables' (a preset); `aliases` add flags for the same key; a table named "hidden" is not shown in --help."""
    parser = argparse.ArgumentParser(prog=prog, description=description.strip().split("\n\n")[0], epilog=epilog,
                                     formatter_class=HelpFormatter)
    for title, table in tables.items():
        group = parser if title == "options" else parser.add_argument_group(title)
        for name, (default, help_text) in table.items():
            default = defaults.get(name, default)
            names = [flag(name), *aliases.get(name, ())]
            shown = argparse.SUPPRESS if title == "hidden" else help_text
            if isinstance(default, bool):
                group.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=default,
                                   help=shown)
            else:
                kind = types.get(name, str if default is None else type(default))
                group.add_argument(*names, dest=name, type=kind, default=default, help=shown,
                                   choices=choices.get(name))
    return parser


def parse_config(prog: str, description: str, tables: Mapping[str, Table], argv: Sequence[str] | None = None, *,
                 presets: Mapping[str, Mapping[str, Any]] = {}, **options: Any) -> tuple[dict[str, Any], set[str]]:
    """Parse `argv` against the tables -> (config: every table entry, names of the flags given explicitly).

    presets: named sets of defaults, chosen with --preset NAME ("default" first); explicit flags still win.
    options: `build_parser`'s choices / types / aliases."""
    preset: dict[str, Any] = {}
    if presets:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", default="default", choices=sorted(presets))
        preset = dict(presets[pre.parse_known_args(argv)[0].preset])
        listed = "; ".join(f"{k}: {v or 'the defaults above'}" for k, v in presets.items())
        options["epilog"] = f"Presets (--preset NAME): {listed}"
        tables = {"preset": {"preset": ("default", "a named set of defaults; explicit flags still win")}, **tables}
        options["choices"] = {**options.get("choices", {}), "preset": sorted(presets)}
    parser = build_parser(prog, description, tables, defaults=preset, **options)
    cfg = vars(parser.parse_args(argv))
    unset = object()  # parse again with every default replaced by `unset`: what remains was given explicitly
    parser.set_defaults(**{k: unset for k in cfg})
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}
    return cfg, given


def continue_config(saved: Mapping[str, Any], cfg: Mapping[str, Any], given: set[str], *, path: object,
                    fixed: Iterable[str], adjustable: Iterable[str] = (), kept: Iterable[str] = (),
                    why: Mapping[str, str] = {}) -> tuple[dict[str, Any], dict[str, list]]:
    """The config of a continued run -> (config, changes {name: [saved, now]}).

    saved: the config the run was trained with (its checkpoint's); `fixed` settings cannot change (UsageError
    naming the first that was given with another value, `why[name]` appended); `adjustable` ones given with
    another value apply from here on and are returned as changes; `kept` ones not given are taken from `saved`
    (e.g. a data folder that may move); so is every other saved setting of the first two groups."""
    fixed, adjustable = set(fixed), set(adjustable)
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
    for k in sorted(given & fixed):
        if k in saved and saved[k] != cfg[k]:
            raise UsageError(f"{flag(k)} {cfg[k]} differs from the {saved[k]} that {path} was trained with"
                             f"{why.get(k, '')}; drop it to continue the run, or add --fresh to start over.")
    changes = {k: [saved[k], cfg[k]] for k in sorted(given & adjustable) if k in saved and saved[k] != cfg[k]}
    taken = {k: saved[k] for k in fixed | adjustable | (set(kept) - given) if k in saved and k not in changes}
    return {**cfg, **taken}, changes
