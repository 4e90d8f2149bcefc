"""What ``train.py`` and ``eval.py`` share on the command line: ``--help`` from the entry point's docstring.

Hydra's stock ``--help`` prints a banner and then the whole composed config (some 200 lines). Each entry
point registers its module docstring, which starts with usage lines and the main options, and the config
groups it reads, with `register_help`; ``hydra.help.template`` (``conf/hydra/default.yaml``,
``conf/eval.yaml``) names the result as ``${t3.help:}``. ``--cfg job`` still prints the whole config and
``--hydra-help`` Hydra's own flags.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["help_text", "register_help"]

#: The OmegaConf resolver that ``hydra.help.template`` calls.
HELP_RESOLVER = "t3.help"


def help_text(doc: str, script: str, conf_dir: str | os.PathLike, groups: Sequence[str]) -> str:
    """The ``--help`` text of ``script``: its docstring, then the options of each config group it reads.

    Hydra fills the template in with `string.Template`, so every ``$`` is escaped.
    """
    lines = [inspect.cleandoc(doc), "", "Config groups (choose an option with group=option):"]
    width = max(len(g) for g in groups)
    for group in groups:
        options = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        lines.append(f"    {group:<{width}}  {', '.join(options)}")
    lines += [
        "",
        f"The whole composed config: python {script} [overrides] --cfg job. Hydra's own flags: --hydra-help.",
    ]
    return "\n".join(lines).replace("$", "$$") + "\n"


def register_help(doc: str | None, script: str, conf_dir: str | os.PathLike, groups: Sequence[str]) -> None:
    """Make ``${t3.help:}`` return `help_text` (idempotent; the entry point calls it when imported)."""
    text = help_text(doc or script, script, conf_dir, groups)
    OmegaConf.register_new_resolver(HELP_RESOLVER, lambda: text, replace=True)
